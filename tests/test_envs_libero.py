"""LIBERO behind the VectorEnv API, one state-only env (one worker process): the exact init state, determinism of
60 seeded steps, and success (BDDL goal check = done, reward 1) once the test puts the object in its goal region."""

from __future__ import annotations

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
from fastnft.envs.libero import LiberoVectorEnv
from fastnft.envs.libero_suites import init_states, seed_for_episode, suite_tasks

TASK, STATE = 3, 7  # libero_object: "pick up the bbq sauce and place it in the basket", init state 7
NOOP = torch.tensor([[0, 0, 0, 0, 0, 0, -1.0]])


@pytest.fixture(scope="module")
def env():
    e = make_env(EnvConfig(task="libero_object", obs_mode="state", max_episode_steps=100), num_envs=1)
    yield e
    e.close()


def test_make_env_builds_libero(env):
    assert isinstance(env, LiberoVectorEnv)
    assert (env.obs_dim, env.act_dim, env.max_episode_steps) == (8, 7, 100)
    assert torch.equal(env.action_low, -torch.ones(7)) and torch.equal(env.action_high, torch.ones(7))


def test_init_state_is_applied_exactly(env):
    task = suite_tasks("libero_object")[TASK]
    want = init_states("libero_object", TASK)[STATE]
    env.call(0, "reset", bddl=str(task.bddl), init_state=want, settle_steps=0)
    got = env.call(0, "get_state")
    assert got.shape == want.shape and np.array_equal(got, want)


def test_sixty_seeded_steps_are_deterministic(env):
    seed = seed_for_episode(TASK, STATE, 0)
    actions = torch.rand(60, 1, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    runs = []
    for _ in range(2):  # the second episode reuses the built sim (soft reset): it must not leak state
        obs0 = env.reset([seed])
        assert env.episodes == [(TASK, STATE)]
        steps = [env.step(a) for a in actions]
        runs.append((obs0, torch.stack([s.obs for s in steps]), env.call(0, "get_state")))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert np.array_equal(runs[0][2], runs[1][2])
    assert runs[0][1].shape == (60, 1, 8) and runs[0][1][:, 0, :3].std(0).min() > 1e-4  # the arm moved


def test_object_in_goal_region_is_success_done_reward_one(env):
    env.reset([seed_for_episode(TASK, STATE, 0)])
    for _ in range(3):  # at the init state the task is not solved
        r = env.step(NOOP)
        assert not bool(r.success[0]) and not bool(r.done[0]) and float(r.reward[0]) == 0.0
    pos = env.call(0, "object_positions")
    assert np.linalg.norm(pos["bbq_sauce_1"][:2] - pos["basket_1"][:2]) > 0.1
    env.call(0, "place_object", name="bbq_sauce_1", pos=pos["basket_1"] + np.array([0.0, 0.0, 0.05]))
    r = env.step(NOOP)
    assert bool(r.success[0]) and bool(r.done[0]) and float(r.reward[0]) == 1.0
    assert bool(env.success_once[0])
