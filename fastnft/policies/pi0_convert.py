"""Rewrite a pi0 / pi0.5 checkpoint directory in another layout (``lerobot``, ``openpi``, ``transformers``).

    python -m fastnft.policies.pi0_convert runs/x/policy_final /path/out --layout openpi

Loads with :meth:`Pi0Policy.load` (any layout :mod:`fastnft.policies.pi0_keymap` knows) and saves with
:meth:`Pi0Policy.save`; the frozen prefix keeps the file's dtype unless ``--vlm-dtype`` says otherwise. Needs the
memory of one model (about 7 GB for the full-size pi0 in bfloat16). Local files only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["convert", "main"]


def _file_prefix_dtype(path: Path) -> str:
    """``bfloat16`` / ``float32``: the dtype the file stores the frozen prefix in (its token embedding)."""
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if "embed_tokens" in k or k.endswith("paligemma.lm_head.weight"):
                return "float32" if f.get_slice(k).get_dtype() in ("F32", "F64") else "bfloat16"
    return "bfloat16"


def convert(src: str | Path, dst: str | Path, layout: str, vlm_dtype: str | None = None) -> Path:
    """Load ``src`` and write it to ``dst`` in ``layout``; returns ``dst``.

    Raises:
        fastnft.policies.pi0_checkpoint.CheckpointError: ``src`` is not a loadable pi0 checkpoint.
        ValueError: unknown layout, or ``transformers`` for pi0.5.
    """
    from fastnft.policies.pi0 import Pi0Policy

    src = Path(src)
    policy = Pi0Policy.load(src, vlm_dtype=vlm_dtype or _file_prefix_dtype(src))
    return policy.save(dst, layout=layout)


def main(argv: list[str] | None = None) -> None:
    """Command line: ``SRC DST --layout {lerobot,openpi,transformers} [--vlm-dtype {bfloat16,float32}]``."""
    p = argparse.ArgumentParser(prog="python -m fastnft.policies.pi0_convert", description=__doc__.splitlines()[0])
    p.add_argument("src", help="checkpoint directory (model.safetensors + config.json)")
    p.add_argument("dst", help="output directory (created; files replaced atomically)")
    p.add_argument("--layout", required=True, choices=("lerobot", "openpi", "transformers"))
    p.add_argument("--vlm-dtype", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the frozen prefix in the output (default: as stored in SRC)")
    a = p.parse_args(argv)
    print(convert(a.src, a.dst, a.layout, a.vlm_dtype))


if __name__ == "__main__":
    main()
