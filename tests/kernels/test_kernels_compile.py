"""Every fused kernel compiles for sm_80 and sm_90 at the shipped shapes, without spills (issue 16, parts 3-4).

No GPU is needed: :mod:`fastnft.kernels.aot` drives the real launchers with a stand-in Triton driver that reports
``GPUTarget("cuda", 80|90, 32)``, so Triton specialises the real arguments and compiles to a cubin with its
bundled ptxas, launching nothing. The kernel tests of this directory run under ``TRITON_INTERPRET=1`` (conftest),
whose kernels cannot compile, so each architecture compiles in a child process without it (both in parallel).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _entry_kernels() -> set[str]:
    """Every ``@triton.jit`` entry point of the kernel modules (helpers called from kernels are inlined)."""
    names = set()
    for mod in ("fastnft.kernels.stepnft_loss", "fastnft.kernels.sde_step", "fastnft.kernels._common"):
        m = importlib.import_module(mod)
        for name, obj in vars(m).items():
            if name.endswith("_kernel") and type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                names.add(name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend (ptxas) is needed")
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated (silences its warning)
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastnft.kernels.aot", "--arch", str(arch), "--cases",
                                     "ci", "--out", str(out / f"sm{arch}.json")], env=env, cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in (80, 90)}
    results = {}
    for arch, p in procs.items():
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"sm_{arch} compile run failed:\n{log[-4000:]}"
        results[arch] = json.loads((out / f"sm{arch}.json").read_text())
    return results


@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_for_the_target(compiled, arch):
    res = compiled[arch]
    assert res["errors"] == [], res["errors"]
    built = {b["kernel"] for b in res["builds"]}
    assert built == _entry_kernels(), f"kernels without a compile case: {_entry_kernels() - built}"
    assert all(res["launches"][k] > 0 for k in built)
    for b in res["builds"]:
        assert b["arch"] == arch and b["registers"] > 0, b


@pytest.mark.parametrize("arch", [80, 90])
def test_no_register_spills_at_shipped_shapes(compiled, arch):
    spills = [(b["kernel"], b["case"], b["registers"], b["spill_stores"], b["spill_loads"])
              for b in compiled[arch]["builds"] if b["spill_stores"] or b["spill_loads"]]
    assert spills == [], f"sm_{arch} spills (kernel, case, registers, store B, load B): {spills}"


def test_shipped_shapes_use_the_gpu_configuration(compiled):
    """The launchers took their GPU branches (not the interpreter's 65536-element blocks) with the shapes of
    configs/: the state policy's loss at 256 tokens x 4 dims over 8 warps, pi0's at 32 x 32."""
    fwd = {(b["case"].split()[0], b["constexprs"]["BLOCK_T"], b["constexprs"]["BLOCK_D"], b["num_warps"])
           for b in compiled[90]["builds"] if b["kernel"] == "_stepnft_fwd_kernel"}
    assert ("state", 256, 4, 8) in fwd and ("pi0", 32, 32, 8) in fwd, fwd
    sde = {b["constexprs"]["BLOCK"] for b in compiled[90]["builds"] if b["kernel"] == "_sde_step_kernel"}
    assert max(sde) == 512, sde
