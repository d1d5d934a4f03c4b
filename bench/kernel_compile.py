"""Compile every fused kernel for sm_80 and sm_90 without a GPU and record registers, spills and shared memory.

    python bench/kernel_compile.py                      # full sweep + launch-config tuning -> bench/kernel_compile.json
    python bench/kernel_compile.py --cases ci --no-tuning --out /tmp/ci.json
    python bench/kernel_compile.py --table              # the Markdown tables of bench/RESULTS.md

One child process per architecture (in parallel, ``TRITON_INTERPRET`` unset) runs :mod:`fastnft.kernels.aot`:
the real launchers, a stand-in Triton driver for ``GPUTarget("cuda", arch, 32)``, Triton's bundled ptxas. The
numbers describe compiled code; nothing runs ("compiled, not run").

The JSON holds, per architecture, every build (kernel, case, constexprs, warps, registers, spill bytes, stack,
shared bytes), compile errors, and a ``summary`` per kernel; ``tuning`` compiles the loss and SDE kernels at the
state policy's and pi0's shapes in the launch configurations considered for issue 16's G5 (the old one first).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (label, shape name, BLOCK_T, num_warps): the loss at D = 4 (state policy) and D = 32 (pi0)
LOSS_TUNING = [("old: 2048 elements, 4 warps", "state", 512, 4), ("512 tokens, 8 warps", "state", 512, 8),
               ("256 tokens, 4 warps", "state", 256, 4), ("new: 1024 elements, 8 warps", "state", 256, 8),
               ("128 tokens, 4 warps", "state", 128, 4),
               ("old: 2048 elements, 4 warps", "pi0", 64, 4), ("64 tokens, 8 warps", "pi0", 64, 8),
               ("new: 1024 elements, 8 warps", "pi0", 32, 8), ("32 tokens, 4 warps", "pi0", 32, 4)]
# (label, BLOCK, num_warps): the SDE step at pi0's rollout shape (64 x 50 x 32: 1024-counter blocks fill)
SDE_TUNING = [("old: BLOCK 1024, 4 warps", 1024, 4), ("BLOCK 1024, 8 warps", 1024, 8),
              ("new: BLOCK 512, 4 warps", 512, 4)]


def _tuning(arch: int) -> list[dict]:
    import torch

    from fastnft.kernels import aot
    from fastnft.kernels import sde_step as sde_mod
    from fastnft.kernels import stepnft_loss as loss_mod

    shapes = {s.name: s for s in aot.SHIPPED}
    rows = []
    real_loss, real_sde = loss_mod._launch_config, sde_mod._launch_config
    try:
        with aot.aot_target(arch) as rec:
            for label, shape, bt, w in LOSS_TUNING:
                s = shapes[shape]
                loss_mod._launch_config = lambda T, D, dev, blk, bt=bt, w=w: (bt, triton_pow2(D), w)
                for dtype in (torch.float32, torch.bfloat16):
                    rec.case = f"tuning loss {shape} {label} {dtype}"
                    n0 = len(rec.builds)
                    aot._loss_case(s, s.micro_batch[0], dtype, mask=True, grad=True)
                    b = next(b for b in rec.builds[n0:] if b.kernel == "_stepnft_fwd_kernel")
                    rows.append({"kernel": b.kernel, "shape": shape, "config": label, "BLOCK_T": bt,
                                 "num_warps": w, "dtype": str(dtype).removeprefix("torch."),
                                 "registers": b.registers, "spill_stores": b.spill_stores,
                                 "spill_loads": b.spill_loads, "shared_bytes": b.shared_bytes})
            for label, blk, w in SDE_TUNING:
                sde_mod._launch_config = lambda q, dev, block, blk=blk, w=w: (blk, w)
                for dtype in (torch.float32, torch.bfloat16, torch.float16):
                    rec.case = f"tuning sde {label} {dtype}"
                    n0 = len(rec.builds)
                    aot._sde_case(shapes["pi0"], 64, dtype)
                    for b in rec.builds[n0:]:
                        path = ("philox" if b.constexprs["NOISE"] and not b.constexprs["HAS_Z"] else
                                "explicit z" if b.constexprs["NOISE"] else "ode")
                        rows.append({"kernel": b.kernel, "shape": "pi0", "config": label, "BLOCK": blk,
                                     "num_warps": w, "dtype": str(dtype).removeprefix("torch."), "path": path,
                                     "registers": b.registers, "spill_stores": b.spill_stores,
                                     "spill_loads": b.spill_loads, "shared_bytes": b.shared_bytes})
    finally:
        loss_mod._launch_config, sde_mod._launch_config = real_loss, real_sde
    return rows


def triton_pow2(n: int) -> int:
    import triton

    return triton.next_power_of_2(n)


def _summary(builds: list[dict]) -> dict:
    out = {}
    for b in builds:
        s = out.setdefault(b["kernel"], {"builds": 0, "builds_with_spills": 0, "max_registers": 0,
                                         "max_spill_stores": 0, "max_shared_bytes": 0, "min_registers": 1 << 30})
        s["builds"] += 1
        s["builds_with_spills"] += bool(b["spill_stores"] or b["spill_loads"])
        s["max_registers"] = max(s["max_registers"], b["registers"])
        s["min_registers"] = min(s["min_registers"], b["registers"])
        s["max_spill_stores"] = max(s["max_spill_stores"], b["spill_stores"])
        s["max_shared_bytes"] = max(s["max_shared_bytes"], b["shared_bytes"])
    return out


def _child(arch: int, cases: str, tuning: bool, out: str) -> None:
    from fastnft.atomic import write_json_atomic
    from fastnft.kernels import aot

    t0 = time.time()
    res = aot.run_cases(arch, aot.ci_cases() if cases == "ci" else aot.full_cases())
    res["tuning"] = _tuning(arch) if tuning else []
    res["summary"] = _summary(res["builds"])
    res["wall_s"] = round(time.time() - t0, 1)
    write_json_atomic(out, res, indent=1, sort_keys=True)


def table(path: Path) -> str:
    """Markdown tables of a result file (for bench/RESULTS.md): the launch-config tuning, then per kernel."""
    res = json.loads(path.read_text())
    a, b = res["sm80"], res["sm90"]
    head = ("| kernel | shape | launch configuration | dtype | sm_80 registers | sm_80 spill B | sm_80 shared B "
            "| sm_90 registers | sm_90 spill B | sm_90 shared B |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for ta, tb in zip(a["tuning"], b["tuning"], strict=True):
        name = ta["kernel"] + (f" ({ta['path']})" if "path" in ta else "")
        lines.append(f"| {name} | {ta['shape']} | {ta['config']} | {ta['dtype']} | {ta['registers']} | "
                     f"{ta['spill_stores']} | {ta['shared_bytes']} | {tb['registers']} | {tb['spill_stores']} | "
                     f"{tb['shared_bytes']} |")
    lines += ["", "| kernel | arch | builds | builds with spills | registers (min-max) | max spill B | max shared B |",
              "|---|---|---|---|---|---|---|"]
    for arch, r in (("sm_80", a), ("sm_90", b)):
        for k, s in sorted(r["summary"].items()):
            lines.append(f"| {k} | {arch} | {s['builds']} | {s['builds_with_spills']} | {s['min_registers']}-"
                         f"{s['max_registers']} | {s['max_spill_stores']} | {s['max_shared_bytes']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", choices=("ci", "full"), default="full")
    p.add_argument("--no-tuning", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "kernel_compile.json"))
    p.add_argument("--table", action="store_true", help="print the Markdown tables of --out and exit")
    p.add_argument("--child-arch", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.table:
        print(table(Path(a.out)))
        return 0
    if a.child_arch:
        _child(a.child_arch, a.cases, not a.no_tuning, a.out)
        return 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    parts = {arch: Path(a.out).with_suffix(f".sm{arch}.part.json") for arch in (80, 90)}
    procs = {arch: subprocess.Popen([sys.executable, __file__, "--child-arch", str(arch), "--cases", a.cases,
                                     "--out", str(path)] + (["--no-tuning"] if a.no_tuning else []), env=env)
             for arch, path in parts.items()}
    if any(p.wait() for p in procs.values()):
        print("a compile child failed", file=sys.stderr)
        return 1
    import torch
    import triton

    from fastnft.atomic import write_json_atomic

    result = {"label": "compiled, not run", "cases": a.cases, "triton": triton.__version__,
              "torch": torch.__version__,
              "command": "python bench/kernel_compile.py" + ("" if a.cases == "full" else f" --cases {a.cases}")}
    for arch, path in parts.items():
        result[f"sm{arch}"] = json.loads(path.read_text())
        path.unlink()
    write_json_atomic(a.out, result, indent=1, sort_keys=True)
    for arch in (80, 90):
        r = result[f"sm{arch}"]
        print(f"sm_{arch}: ptxas {r['ptxas']}, {len(r['builds'])} builds, {len(r['errors'])} errors, "
              f"{r['wall_s']} s")
        for k, s in sorted(r["summary"].items()):
            print(f"  {k}: {s}")
        for t in r["tuning"]:
            print(f"  tuning {t}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
