"""LIBERO with two small cameras in a two-env vector env (two worker processes): frame shapes and the 180 degree
rotation, the seed -> (task, state) map and per-env instructions, the episode limit, camera slots by name, workers
without torch, and a clean close."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnft.config import EnvConfig
from fastnft.envs.libero_assets import LiberoAssetError, libero_root

pytestmark = [pytest.mark.libero, pytest.mark.slow]
try:
    libero_root()
except LiberoAssetError as e:
    pytest.skip(f"LIBERO not installed: {e}", allow_module_level=True)

from fastnft.envs import make_env
from fastnft.envs.libero_suites import episode_for_seed, suite_tasks

SIZE, LIMIT = 32, 4


@pytest.fixture(scope="module")
def env():
    cfg = EnvConfig(task="libero_object", obs_mode="rgb", cameras=["agentview", "wrist"], image_size=SIZE,
                    camera_slots={"wrist": "left_wrist_0_rgb"}, max_episode_steps=LIMIT)
    e = make_env(cfg, num_envs=2)
    yield e
    e.close()


def test_frames_state_and_instructions(env):
    seeds = [0, 1]
    obs = env.reset(seeds)
    assert env.episodes == [episode_for_seed(s) for s in seeds]
    assert env.episodes[0][0] != env.episodes[1][0]  # consecutive seeds: two different tasks here
    tasks = suite_tasks("libero_object")
    assert obs["task"] == [tasks[t].instruction for t, _ in env.episodes]
    assert set(obs) == {"observation.images.agentview", "observation.images.left_wrist_0_rgb", "observation.state",
                        "task"}
    for k in ("observation.images.agentview", "observation.images.left_wrist_0_rgb"):
        assert obs[k].shape == (2, SIZE, SIZE, 3) and obs[k].dtype == torch.uint8
        assert obs[k].float().std() > 5  # a rendered scene, not a blank frame
    assert obs["observation.state"].shape == (2, 8) and obs["observation.state"].dtype == torch.float32
    grip = obs["observation.state"][:, 6:8]
    assert (grip[:, 0] > 0).all() and (grip[:, 1] < 0).all()  # gripper fingers open after the settling steps


def test_frames_are_rotated_180_degrees(env):
    env.reset([0, 1])
    res = env.step(torch.zeros(2, 7))
    raw = env.call(0, "raw_frames")  # MuJoCo's frames at the same state, as rendered
    for cam, key in (("agentview", "observation.images.agentview"), ("wrist", "observation.images.left_wrist_0_rgb")):
        got = res.obs[key][0].numpy().astype(np.float64)
        rotated = np.abs(got - raw[cam][::-1, ::-1]).mean()  # a re-render may differ in a few pixels
        unrotated = np.abs(got - raw[cam]).mean()
        assert rotated < 1.0 and unrotated > 10 * max(rotated, 0.5), (cam, rotated, unrotated)


def test_episode_limit_and_latched_done(env):
    env.reset([0, 1])
    for t in range(LIMIT):
        r = env.step(torch.zeros(2, 7))
        assert bool(r.done.all()) == (t == LIMIT - 1)
    assert not bool(env.success_once.any())
    chunk = env.step_chunk(torch.zeros(2, 3, 7))  # after the end: nothing runs
    assert chunk.steps.tolist() == [0, 0]


def test_workers_do_not_import_torch_and_close_cleanly(env):
    pids = env.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "mujoco" in maps and "libtorch" not in maps
    assert os.environ.get("LIBERO_CONFIG_PATH")  # this process's private config, inherited by the workers
    env.close()
    env.close()  # idempotent
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    with pytest.raises(RuntimeError, match="closed"):
        env.reset([0, 1])
