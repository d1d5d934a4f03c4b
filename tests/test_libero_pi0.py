"""The tiny random pi0 on LIBERO-Object through the real CLI: one StepNFT iteration (`fastnft train`), then the
LIBERO protocol on two tasks x two init states (`fastnft eval --protocol libero`), resumed without rerunning."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastnft.envs.libero_assets import LiberoAssetError, libero_root

pytestmark = [pytest.mark.libero, pytest.mark.slow]
try:
    libero_root()
except LiberoAssetError as e:
    pytest.skip(f"LIBERO not installed: {e}", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "libero_object_pi0_tiny.yaml"


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "fastnft.cli", *args], check=False, capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=REPO, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_tiny_pi0_trains_one_iteration_then_protocol_eval(tmp_path):
    run = tmp_path / "run"
    _cli("train", "--config", str(CONFIG), "--set", f"run_dir={run}", "--no-progress")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    it = [m for m in metrics if "update/loss" in m]
    assert len(it) == 1 and it[0]["update/steps"] >= 1 and it[0]["update/loss"] == it[0]["update/loss"]
    assert (run / "policy_final" / "model.safetensors").is_file()

    out_dir = tmp_path / "eval"
    args = ("eval", "--config", str(CONFIG), "--run", str(run), "--protocol", "libero", "--tasks", "0,1",
            "--states", "0,1", "--out", str(out_dir), "--no-progress")
    res = _cli(*args)
    assert "| Policy | Object | Avg. |" in res.stdout
    lines = (out_dir / "episodes.jsonl").read_text().splitlines()
    eps = {(r["task"], r["state"]) for r in map(json.loads, lines)}
    assert len(lines) == 4 and eps == {(0, 0), (0, 1), (1, 0), (1, 1)}
    summary = json.loads((out_dir / "libero_results.json").read_text())
    obj = summary["suites"]["libero_object"]
    assert obj["episodes"] == 4 and summary["complete"] and summary["versions"]["mujoco"].startswith("3.")
    assert all(r["steps"] == 8 or r["success"] for r in map(json.loads, lines))  # the limit override holds
    _cli(*args)  # a finished evaluation resumes to nothing: no episode is run or counted twice
    assert (out_dir / "episodes.jsonl").read_text().splitlines() == lines
