"""The ``fastnft`` CLI end to end on the bandit (no simulator): smoke run, dry run, bad input, kill -9 + resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kill_helpers import kill_after_checkpoint

from fastnft.engine.checkpoint import list_checkpoints, load_latest
from fastnft.metrics import read_jsonl

TINY = ["sft.steps=30", "sft.num_demos=256", "env.num_envs=64", "train.episodes_per_iter=64",
        "train.eval_episodes=64", "policy.width=32", "policy.heads=2", "train.micro_batch=64"]


def fastnft(*args, tmp: Path, extra=(), check=True, timeout=900):
    sets = []
    for kv in [f"run_dir={tmp / 'run'}", f"data_dir={tmp / 'data'}", *TINY, *extra]:
        sets += ["--set", kv]
    cmd = [sys.executable, "-m", "fastnft.cli", *args, "--config", "configs/bandit_stepnft.yaml", *sets]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


@pytest.fixture(scope="module")
def sft_tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    out = fastnft("sft", "--no-progress", tmp=tmp)
    assert "SFT policy:" in out.stdout
    return tmp


def test_pipeline_smoke_one_iteration(sft_tmp):
    out = fastnft("pipeline", "--no-progress", tmp=sft_tmp, extra=["train.iterations=1", "train.eval_every=1"])
    report = json.loads((sft_tmp / "run" / "report.json").read_text())
    assert report["sft"]["episodes"] == 64 and report["stepnft"]["episodes"] == 64
    assert (sft_tmp / "run" / "success_curve.png").stat().st_size > 1000
    assert "π-StepNFT" in out.stdout and "held-out success" in out.stdout
    # where the time went: every phase of the job, the rollout's split between env and policy, and its rate
    st = report["stages"]
    for key in ("sft_s", "rollout_env_s", "rollout_policy_s", "update_s", "diagnostics_s", "evaluation_s",
                "total_s"):
        assert key in st, key
    assert st["rollout_env_s"] > 0 and st["rollout_policy_s"] > 0 and st["evaluation_s"] > 0
    assert st["rollout_env_steps_per_s"] > 0 and "Where the time went" in out.stdout
    recs = read_jsonl(sft_tmp / "run" / "metrics.jsonl")
    train = [r for r in recs if r["kind"] == "train"]
    assert len(train) == 1 and 0.0 <= train[0]["labels/positive_share"] <= 1.0
    for key in ("fresh/logit_abs", "fresh/sep_over_std", "replayed/loss", "ema/decay", "perf/env_steps_per_s"):
        assert key in train[0], key
    assert list((sft_tmp / "run" / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert list_checkpoints(sft_tmp / "run")
    # the final EMA policy: as a policy file and from the run's checkpoint, with the same held-out result
    assert (sft_tmp / "run" / "policy_final.pt").is_file()
    a = json.loads(fastnft("eval", "--run", str(sft_tmp / "run"), tmp=sft_tmp).stdout.strip().splitlines()[-1])
    b = json.loads(fastnft("eval", "--policy", str(sft_tmp / "run" / "policy_final.pt"),
                           tmp=sft_tmp).stdout.strip().splitlines()[-1])
    assert a == b and a["success_rate"] == report["stepnft"]["success_rate"]


def test_dry_run_builds_and_exits(sft_tmp):
    out = fastnft("train", "--dry-run", tmp=sft_tmp, extra=[f"run_dir={sft_tmp / 'dry'}"])
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["dry_run"] == "ok" and info["obs_dim"] == 4 and info["act_dim"] == 2
    assert not (sft_tmp / "dry" / "metrics.jsonl").exists()


@pytest.mark.parametrize("extra,needle", [
    (["train.iterations=0"], "train.iterations"),
    (["train.lr_rate=1"], "unknown config key"),
])
def test_bad_config_exits_2_with_message(sft_tmp, extra, needle):
    out = fastnft("train", tmp=sft_tmp, extra=extra, check=False)
    assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr


def test_missing_and_incompatible_policy(sft_tmp, tmp_path):
    out = fastnft("train", tmp=tmp_path, check=False)
    assert out.returncode == 2 and "run `fastnft sft" in out.stderr
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    out = fastnft("train", "--init", str(bad), tmp=sft_tmp, check=False)
    assert out.returncode == 2 and "unreadable" in out.stderr
    # SFT policy of width 32 used with a config of width 64
    init = next((sft_tmp / "data" / "sft").glob("*.pt"))
    out = fastnft("train", "--init", str(init), tmp=sft_tmp, extra=["policy.width=64"], check=False)
    assert out.returncode == 2 and "policy.width" in out.stderr


def test_unknown_task_is_a_clear_error(sft_tmp):
    out = fastnft("eval", tmp=sft_tmp, extra=["env.task=PickCbe-v1"], check=False)
    assert out.returncode == 2 and "unknown ManiSkill3 task 'PickCbe-v1'" in out.stderr
    assert "PickCube-v1" in out.stderr  # the suggestion


def test_kill_9_then_resume(sft_tmp):
    run = sft_tmp / "resume"
    extra = [f"run_dir={run}", "train.iterations=60", "train.checkpoint_every=1", "train.eval_every=30"]
    sets = []
    for kv in [f"data_dir={sft_tmp / 'data'}", *TINY, *extra]:
        sets += ["--set", kv]
    cmd = [sys.executable, "-m", "fastnft.cli", "train", "--no-progress", "--config", "configs/bandit_stepnft.yaml",
           *sets]
    # iteration 4's file exists only after iteration 3's pointer was written
    killed_at = kill_after_checkpoint(cmd, run, 4, env=dict(os.environ, OMP_NUM_THREADS="1"),
                                      log=sft_tmp / "resume.stderr")
    assert 3 <= killed_at < 60, f"kill landed at iteration {killed_at}; the test needs a mid-run kill"
    it, _ = load_latest(run)
    assert it >= 3
    out = fastnft("train", "--resume", "--no-progress", tmp=sft_tmp, extra=extra)
    assert "held-out success" in out.stdout
    recs = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    iters = [r["iteration"] for r in recs]
    assert iters == list(range(1, 61)), f"metrics after resume: {iters}"
    final_it, state = load_latest(run)
    assert final_it == 60 and state["history"][-1]["iteration"] == 60


@pytest.mark.distributed
def test_two_ranks_torchrun_zero2(sft_tmp):
    """2 processes (gloo, ZeRO-2): each rank runs its own envs on disjoint seeds; metrics sum over ranks."""
    run = sft_tmp / "ddp"
    sets = []
    for kv in [f"data_dir={sft_tmp / 'data'}", f"run_dir={run}", *TINY, "engine.zero_stage=2",
               "train.iterations=2", "train.checkpoint_every=1"]:
        sets += ["--set", kv]
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "fastnft.train", "--no-progress", "--config", "configs/bandit_stepnft.yaml",
           *sets]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("final held-out success") == 1, "only rank 0 reports"
    train = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2]
    assert all(r["rollout/episodes"] == 2 * 64 for r in train), "episodes must be summed over both ranks"
    it, state = load_latest(run)
    assert it == 2 and len(state["rng"]) == 2


def test_child_of_a_training_process_gets_its_own_world(sft_tmp):
    """A process that already made a single-process world (as the bandit test does in pytest) exports RANK,
    WORLD_SIZE and MASTER_PORT; a `fastnft` child must not take them for a launch and reuse the parent's port."""
    from fastnft.engine import dist as fdist

    fdist.init_distributed()
    assert os.environ.get("MASTER_PORT") and os.environ.get("WORLD_SIZE") == "1"
    out = fastnft("train", "--dry-run", tmp=sft_tmp, extra=[f"run_dir={sft_tmp / 'child'}"])
    assert json.loads(out.stdout.strip().splitlines()[-1])["dry_run"] == "ok"
