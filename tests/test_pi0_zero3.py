"""pi0 under ``engine.zero_stage: 3`` (issue 16, G3): the tiny pi0 trains one StepNFT iteration on CPU (gloo, one
rank) under ZeRO-3 and under ZeRO-2, each in a fresh interpreter (``tests/pi0_zero3_worker.py``).

Before the fix, ZeRO-3 partitioned the frozen PaliGemma prefix in place; the EMA rollout copy shares those
tensors (``Pi0Model.__deepcopy__``), so its prefix became empty stubs and the first rollout failed ("weight should
have at least three dimensions"). Now only the trainable submodules go to DeepSpeed (``fastnft.engine.zero``).
Oracle: ZeRO-2 (which never partitions parameters) on the same seeds: one rank, so the trained and EMA weights must
agree to float32 round-off. About 1 minute per launch on 2 shared CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).resolve().parent / "pi0_zero3_worker.py")


def _launch(out: Path, stage: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "fastnft" / "torch_extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, WORKER, "--out", str(out), "--stage", str(stage)], check=False, cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker (stage {stage}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return {**json.loads((out / "result.json").read_text()), "state": torch.load(out / "state.pt")}


def test_pi0_trains_under_zero3_like_zero2(tmp_path):
    z3 = _launch(tmp_path / "z3", 3)
    assert z3["ema_prefix_intact"] and z3["live_prefix_intact"] and z3["num_frozen"] > 0
    assert z3["global_steps"] >= 1 and z3["ckpt_params"] == z3["num_trainable"]
    assert z3["max_update"] > 0  # the update moved the expert
    z2 = _launch(tmp_path / "z2", 2)
    assert z3["loss"] == pytest.approx(z2["loss"], abs=1e-6)
    assert z3["success_rate"] == z2["success_rate"]
    for part in ("actor", "ema"):
        a, b = z3["state"][part], z2["state"][part]
        assert a.keys() == b.keys() and a
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6, msg=f"{part} {n}")
