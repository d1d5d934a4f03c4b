"""Does the transformers version change fastnft's pi0 / pi0.5? Same weights, same inputs, two versions.

    python bench/check_transformers_versions.py save /tmp/ref.pt                       # under version A
    PYTHONPATH=/path/to/version_B:$PWD python bench/check_transformers_versions.py compare /tmp/ref.pt \\
        --json bench/transformers_versions.json                                          # under version B

``save`` builds the tiny test policies (pi0 and pi0.5, prefix in float32 and bfloat16; ``tests/test_pi0_model.py``'s
builders), and stores their weights and velocities. ``compare`` builds the same policies under the other version,
loads the stored weights (SigLIP's names are matched with and without the ``vision_model.`` level, which moved
within 5.x) and reports the largest velocity difference. Used to support the pin ``transformers>=5,<6``
(docs/pi0_numerics.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_pi0_model import _inputs, _policy, _xt

CASES = [(v, d) for v in ("pi0", "pi05") for d in ("float32", "bfloat16")]


def _canon(key: str) -> str:
    return key.replace("vision_tower.vision_model.", "vision_tower.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["save", "compare"])
    ap.add_argument("ref", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    saved = torch.load(a.ref) if a.mode == "compare" else {"transformers": transformers.__version__}
    rows = []
    for variant, vdt in CASES:
        pol = _policy(variant, vlm_dtype=vdt)
        key = f"{variant}-{vdt}"
        inp, (x, t) = _inputs(pol.cfg), _xt(pol.cfg)
        if a.mode == "save":
            saved[key] = ({k: v.clone() for k, v in pol.model.state_dict().items()}, pol.velocity(x, t, pol.encode(inp)))
            continue
        sd, v_ref = saved[key]
        by_canon = {_canon(k): k for k in pol.model.state_dict()}
        pol.model.load_state_dict({by_canon[_canon(k)]: v for k, v in sd.items()}, strict=True)
        v = pol.velocity(x, t, pol.encode(inp))
        rows.append({"variant": variant, "vlm_dtype": vdt, "max_abs_diff_velocity": float((v - v_ref).abs().max()),
                     "mean_abs_velocity": float(v.abs().mean())})
        print(json.dumps(rows[-1]))
    if a.mode == "save":
        torch.save(saved, a.ref)
        return
    out = {"reference_transformers": saved["transformers"], "compared_transformers": transformers.__version__,
           "torch": torch.__version__, "rows": rows}
    if a.json:
        from fastnft.atomic import write_json_atomic

        write_json_atomic(a.json, out, indent=2)


if __name__ == "__main__":
    main()
