"""ManiSkill3 adapter on the CPU backend (spawned single-env workers, Mesa lavapipe Vulkan).

One 2-env PickCube adapter is built per module (startup costs seconds) and reused by the tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastnft.config import EnvConfig

pytestmark = pytest.mark.maniskill

try:
    from fastnft.envs.maniskill import vulkan_available

    _OK, _WHY = vulkan_available()
except Exception as e:  # noqa: BLE001 - any import failure means skip; broken install
    _OK, _WHY = False, f"fastnft.envs.maniskill does not import: {e}"
if not _OK:
    pytest.skip(f"ManiSkill3 unusable here: {_WHY}", allow_module_level=True)

from fastnft.envs.maniskill import ManiSkillVectorEnv, _worker_pids

# PickCube-v1 state observation layout (ManiSkill 3.0.x): qpos 0:9, qvel 9:18, is_grasped 18, tcp_pose 19:26,
# goal_pos 26:29, obj_pose 29:36, tcp_to_obj 36:39, obj_to_goal 39:42.
IS_GRASPED, GOAL = 18, slice(26, 29)
MAX_STEPS = 100


@pytest.fixture(scope="module")
def env():
    e = ManiSkillVectorEnv(EnvConfig(sim_backend="cpu", max_episode_steps=MAX_STEPS), num_envs=2)
    yield e
    e.close()


def test_shapes_dtypes_and_bounds(env):
    assert (env.num_envs, env.obs_dim, env.act_dim, env.max_episode_steps) == (2, 42, 4, MAX_STEPS)
    assert env.action_low.dtype == torch.float32 and env.action_low.shape == (4,)
    assert torch.equal(env.action_low, -torch.ones(4)) and torch.equal(env.action_high, torch.ones(4))
    obs = env.reset([0, 1])
    assert obs.shape == (2, 42) and obs.dtype == torch.float32 and torch.isfinite(obs).all()
    res = env.step(torch.zeros(2, 4))
    assert res.obs.shape == (2, 42) and res.obs.dtype == torch.float32
    assert res.reward.shape == (2,) and res.reward.dtype == torch.float32
    assert res.success.dtype == torch.bool and res.done.dtype == torch.bool and res.done.shape == (2,)
    assert not res.done.any()
    with pytest.raises(ValueError, match="seed"):
        env.reset([0])


def test_reset_is_deterministic_per_seed(env):
    a = env.reset([7, 8])
    env.step(torch.rand(2, 4) * 2 - 1)  # move things so a reset has something to undo
    b = env.reset([7, 8])
    assert torch.equal(a, b), (a - b).abs().max()
    c = env.reset([8, 7])  # per-env seeds, not one seed for all
    assert torch.equal(c[0], a[1]) and torch.equal(c[1], a[0])
    assert not torch.equal(a[0, GOAL], a[1, GOAL]), "different seeds should place different goals"


def test_random_episode_runs_to_time_limit_without_autoreset(env):
    gen = torch.Generator().manual_seed(0)
    obs0 = env.reset([11, 12])
    for t in range(1, MAX_STEPS + 1):
        res = env.step(torch.rand(2, 4, generator=gen) * 2 - 1)
        if t < MAX_STEPS:
            assert not res.done.any() or res.success.any(), f"done too early at step {t}"
    assert res.done.all() and not env.success_once.any()
    # A chunk after the end neither steps the finished episodes nor starts new ones (a reset would draw a new goal).
    sim = env.sim_steps
    res2 = env.step_chunk(torch.zeros(2, 3, 4))
    assert env.sim_steps == sim and res2.steps.tolist() == [0, 0], "finished episodes must not be simulated"
    assert res2.done.all() and torch.equal(res2.obs, res.obs) and (res2.reward == 0).all()
    assert torch.equal(res2.obs[:, GOAL], obs0[:, GOAL])


def test_unknown_task_id_is_a_clear_error():
    with pytest.raises(ValueError, match=r"PickCub-v9.*PickCube-v1"):
        ManiSkillVectorEnv(EnvConfig(task="PickCub-v9", sim_backend="cpu"), num_envs=1)


def test_close_stops_workers():
    e = ManiSkillVectorEnv(EnvConfig(sim_backend="cpu"), num_envs=1)
    pids = _worker_pids(e)
    folder = e._pool.folder
    assert pids and all(_alive(p) for p in pids) and folder.is_dir()
    e.close()
    e.close()  # idempotent
    assert not any(_alive(p) for p in pids)
    assert not folder.exists(), "the pool's private folder (observations, logs) must be removed"
    with pytest.raises(RuntimeError, match="closed"):
        e.reset([0])


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_missing_vulkan_says_how_to_fix():
    code = textwrap.dedent("""
        from fastnft.config import EnvConfig
        from fastnft.envs.maniskill import ManiSkillVectorEnv
        try:
            ManiSkillVectorEnv(EnvConfig(sim_backend="cpu"), num_envs=1)
        except RuntimeError as e:
            print("RAISED", e)
    """)
    env = dict(os.environ, VK_ICD_FILENAMES="/nonexistent/icd.json", VK_DRIVER_FILES="/nonexistent/icd.json")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert "RAISED" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "bash scripts/install.sh" in out.stdout and "lavapipe" in out.stdout
