"""bf16 training on CPU (issue 7, part 3): the bandit trains with ``engine.dtype=bfloat16``, is killed with -9,
resumes, and the iterations after the resume point give the same metrics as an uninterrupted run.

bf16 is torch autocast inside the policy (CPU supports it); the optimizer, EMA and checkpoints hold fp32 master
weights, so a resumed run continues the exact trajectory. Timing metrics (``time/*``, ``perf/*``) are excluded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_helpers import kill_after_checkpoint

from fastnft.engine.checkpoint import load_latest
from fastnft.metrics import read_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SETS = ["sft.steps=30", "sft.num_demos=256", "env.num_envs=64", "train.episodes_per_iter=64",
        "train.eval_episodes=64", "policy.width=32", "policy.heads=2", "train.micro_batch=32",
        "engine.dtype=bfloat16", "train.iterations=6", "train.checkpoint_every=1", "train.eval_every=0"]


def _cmd(tmp: Path, run: str, *args: str) -> list[str]:
    sets = []
    for kv in [f"data_dir={tmp / 'data'}", f"run_dir={tmp / run}", *SETS]:
        sets += ["--set", kv]
    return [sys.executable, "-m", "fastnft.cli", *args, "--no-progress", "--config", "configs/bandit_stepnft.yaml",
            *sets]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTNFT_SINGLE_PROCESS_PID"):
        env.pop(k, None)
    return env


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=_env(), check=False)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


def _train_metrics(run_dir: Path) -> dict[int, dict]:
    keep = {}
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r["kind"] == "train":
            keep[r["iteration"]] = {k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "wall"))}
    return keep


def test_bf16_kill_9_resume_matches_uninterrupted(tmp_path):
    _run(_cmd(tmp_path, "run", "sft"))
    _run(_cmd(tmp_path, "full", "train"))
    full = _train_metrics(tmp_path / "full")
    assert sorted(full) == list(range(1, 7))
    # fp32 masters in the checkpoint, although the policy computed in bf16
    _, state = load_latest(tmp_path / "full")
    for part in ("actor", "ema"):
        assert all(t.dtype == torch.float32 for t in state[part]["params"].values())
    assert state["actor"]["optim"]["step"] == full[6]["update/steps"] * 6

    run = tmp_path / "killed"
    killed_at = kill_after_checkpoint(_cmd(tmp_path, "killed", "train"), run, 2, env=_env(), cwd=REPO,
                                      log=tmp_path / "killed.stderr", timeout_s=300)
    assert 2 <= killed_at < 6, f"the kill landed at iteration {killed_at}; the test needs a mid-run kill"
    _run(_cmd(tmp_path, "killed", "train", "--resume"))
    resumed = _train_metrics(run)
    assert sorted(resumed) == list(range(1, 7))
    nxt = killed_at + 1
    assert resumed[nxt] == full[nxt], f"iteration {nxt} after resuming at {killed_at} differs from the " \
                                      "uninterrupted run"
    for it in range(nxt, 7):
        assert resumed[it] == full[it], it
