"""Measure what docs/pi0_checkpoints.md quotes: key-map counts on the full-size fixtures and fastnft's pi0 against
transformers' ``PI0ForConditionalGeneration`` (fp32, CPU, tiny random models), written to one JSON file.

    PYTHONPATH=$PWD python scripts/pi0_reference_diffs.py --out results/pi0_checkpoints/reference_diffs.json

Uses the builders of tests/test_pi0_keymap.py and tests/test_pi0_transformers_ref.py, so the numbers come from the
code the tests assert on. Rows:

- ``save_bytes``: tensor bytes of ``model.safetensors`` per save layout at full size (bfloat16 prefix, float32
  expert), and of the model's own tensors.
- ``fixtures``: per lerobot key set, missing / unexpected / shape-mismatched keys after the key map (full size, meta
  device, the on-disk file simulated with one name per tied group).
- ``transformers_to_fastnft`` / ``fastnft_to_transformers``: max abs differences of the velocity and of K = 4 and
  K = 10 Euler samples from the same noise, as tests/test_pi0_transformers_ref.py measures them (transformers
  given openpi's float64 time embedding when fastnft's is float64, ``fastnft_time_embedding_is_float64``).
- ``time_embedding_float64_vs_transformers_float32``: fastnft given openpi's float64 time embedding against
  transformers' float32 one (the size of that disagreement).
- ``openpi_time_grid``: fastnft's sampler (``t_i = 1 - i / K``, as lerobot and transformers) against openpi's loop,
  which accumulates ``t += dt`` in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _fixtures() -> dict:
    import test_pi0_keymap as K

    from fastnft.policies import pi0_keymap as km

    out = {}
    for name, variant, layout in K.CASES:
        path = K.FIXTURES / f"{name}.json"
        if not path.is_file():
            out[name] = {"skipped": f"{path} absent"}
            continue
        fx = json.loads(path.read_text())
        disk = K._on_disk(fx)
        found, got_layout = km.to_canonical(disk)
        exp = K._expected(K._meta_model(variant))
        out[name] = {"state_dict_keys": len(fx["keys"]), "file_keys": len(disk), "layout": got_layout,
                     "variant_from_weights": km.detect_variant(disk), "model_keys": len(exp),
                     "missing": len(set(exp) - set(found)), "unexpected": len(set(found) - set(exp)),
                     "shape_mismatches": sum(tuple(found[k]) != exp[k] for k in set(exp) & set(found)),
                     "n_params": fx["n_params"]}
    return out


def _save_sizes() -> dict:
    """Tensor bytes of model.safetensors per save layout at full size, in fastnft's dtypes (bfloat16 prefix,
    float32 expert and projections), computed on the meta device."""
    import test_pi0_keymap as K

    from fastnft.policies import pi0_keymap as km

    out = {}
    for variant in ("pi0", "pi05"):
        model = K._meta_model(variant)
        canon = {c: v for c, (_, v) in km.model_expected(model.state_dict()).items()}
        kw = {"vocab_size": model.cfg.vlm.vocab_size, "expert_width": model.cfg.expert.width, "variant": variant}
        size = {"model_tensors": sum(v.numel() * v.element_size() for v in canon.values())}
        for layout in km.SAVE_LAYOUTS if variant == "pi0" else ("lerobot", "openpi"):
            t = km.from_canonical(canon, layout, **kw)
            size[layout] = sum(v.numel() * v.element_size() for v in t.values())
        out[variant] = size
    return out


def _reference() -> dict:
    import test_pi0_transformers_ref as R

    import fastnft.policies.pi0 as P

    cfg = R.Pi0Config.tiny("pi0", cameras=R.CAMS, chunk_size=5, n_action_steps=5, max_state_dim=6,
                           max_action_dim=7, state_dim=6, action_dim=7)
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    ref = R.tf.PI0ForConditionalGeneration(R._ref_config(cfg)).eval()
    R._randomise(ref, 2)
    ref.save_pretrained(tmp / "ref")
    pol = R.Pi0Policy.load(tmp / "ref", cameras=R.CAMS, vlm_dtype="float32", attention="sdpa", **R.NO_STATS).eval()
    import pytest

    patch = pytest.MonkeyPatch()  # the tests' rule: transformers gets openpi's float64 time embedding iff fastnft has it
    R._match_time_embedding(patch, pol)
    out = {"fastnft_time_embedding_is_float64": R._fastnft_time_is_float64(pol),
           "transformers_to_fastnft": R._diffs(pol, ref, cfg)}

    torch.manual_seed(0)
    ours = R.Pi0Policy(cfg).eval()
    R._randomise(ours.model, 3)
    ours.save(tmp / "ours", layout="transformers")
    back, info = R.tf.PI0ForConditionalGeneration.from_pretrained(tmp / "ours", output_loading_info=True)
    out["fastnft_to_transformers"] = R._diffs(ours, back.eval().float(), cfg)
    out["fastnft_to_transformers"]["load_info_problems"] = sum(len(info[k]) for k in
                                                               ("missing_keys", "unexpected_keys", "mismatched_keys"))
    patch.undo()  # below: transformers' own float32 time embedding

    orig = P.sinusoidal_time_embedding
    P.sinusoidal_time_embedding = lambda t, dim, lo=4e-3, hi=4.0, *_, **__: R._openpi_time(t, dim, lo, hi).float()
    try:
        out["time_embedding_float64_vs_transformers_float32"] = R._diffs(pol, ref, cfg)
    finally:
        P.sinusoidal_time_embedding = orig

    ours_in, _, x, _ = R._inputs(cfg)
    grid = {}
    with torch.no_grad():
        ctx = ours.encode(ours_in)
        for K in (4, 10):
            exact = R.sample_actions(lambda xx, tt: ours.velocity(xx, tt, ctx), x, R.flow_sde_schedule(K, 0.0),
                                     stochastic=False).actions
            dt = torch.tensor(-1.0 / K, dtype=torch.float32)
            t = torch.tensor(1.0, dtype=torch.float32)
            xt, n, dt_max = x.clone(), 0, 0.0
            while t >= -dt / 2:  # openpi's PI0Pytorch.sample_actions loop
                dt_max = max(dt_max, abs(t.item() - (1 - n / K)))
                xt = xt + dt * ours.velocity(xt, t.expand(x.shape[0]), ctx)
                t = t + dt
                n += 1
            grid[f"K={K}"] = {"steps": n, "max_abs_time_diff": dt_max,
                              "sample_max_abs_diff": (xt - exact).abs().max().item()}
    out["openpi_time_grid"] = grid
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/pi0_checkpoints/reference_diffs.json")
    a = p.parse_args()
    import transformers

    res = {"command": "PYTHONPATH=$PWD python scripts/pi0_reference_diffs.py --out " + a.out,
           "torch": torch.__version__, "transformers": transformers.__version__, "device": "cpu", "dtype": "float32",
           "fixtures": _fixtures(), "save_bytes": _save_sizes(), **_reference()}
    from fastnft.atomic import atomic_write

    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(res, indent=2, sort_keys=True)
    atomic_write(path, lambda f: f.write(text + "\n"), text=True)
    print(text)


if __name__ == "__main__":
    main()
