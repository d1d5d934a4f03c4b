"""ManiSkill PickCube-v1 on the worker pool: the same episodes give the same records whatever the number of workers
and slots, and a worker killed with SIGKILL mid-rollout is replaced, its episodes rerun with the same noise."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fastnft.config import EnvConfig, NFTConfig, PolicyConfig
from fastnft.envs.maniskill import ManiSkillVectorEnv, vulkan_available
from fastnft.loop.rollout import run_episodes
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule

ok, why = vulkan_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

CFG = EnvConfig(task="PickCube-v1", sim_backend="cpu", max_episode_steps=15)


def _rollout(env, seeds):
    torch.manual_seed(0)
    policy = StateFlowPolicy(env.obs_dim, env.act_dim, PolicyConfig(horizon=8, n_action_steps=5, width=32, depth=1,
                                                                    heads=2, num_steps=4))
    return run_episodes(policy, env, flow_sde_schedule(4, 0.2), seeds, stochastic=True, record=True,
                        generator=torch.Generator().manual_seed(0), nft=NFTConfig(steps_per_call=4))


def _records(run):
    buf, st = run
    per_episode = [(bool(st.episode_success[e]), int(st.episode_steps[e]), float(st.episode_score[e]),
                    buf.obs[buf.episode == e], buf.x0[buf.episode == e]) for e in range(st.episodes)]
    return per_episode, buf


def _assert_same(a, b):
    (ra, ba), (rb, bb) = _records(a), _records(b)
    for e, (x, y) in enumerate(zip(ra, rb, strict=True)):
        assert x[:3] == y[:3], f"episode {e}: {x[:3]} != {y[:3]}"
        assert torch.equal(x[3], y[3]) and torch.equal(x[4], y[4]), f"episode {e}: observations or actions differ"
    for name in ("x_t", "v_old", "x_next", "step", "y"):
        assert torch.equal(getattr(ba, name), getattr(bb, name)), name


def test_same_16_episodes_with_1_worker_and_with_2_workers_x_4_envs():
    seeds = [100 + s // 2 for s in range(16)]
    runs = []
    for num_envs, workers in ((3, 1), (8, 2)):
        env = ManiSkillVectorEnv(CFG, num_envs=num_envs, num_workers=workers)
        try:
            assert env.num_workers == workers
            runs.append(_rollout(env, seeds))
        finally:
            env.close()
    _assert_same(runs[0], runs[1])
    st = runs[0][1]
    assert st.sim_steps == st.env_steps, "a pool simulates only the steps episodes use"


def test_worker_killed_mid_rollout_is_replaced_and_its_episodes_rerun():
    seeds = [200, 201, 202, 203]
    env = ManiSkillVectorEnv(CFG, num_envs=2, num_workers=2)
    try:
        ref = _rollout(env, seeds)
        calls = {"n": 0}
        real = env.step_chunk

        def kill_on_second(actions):
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(env.worker_pids()[1], signal.SIGKILL)
            return real(actions)

        env.step_chunk = kill_on_second  # type: ignore[method-assign]
        before = env.worker_pids()
        with pytest.warns(RuntimeWarning, match="lost to a simulator worker that died"):
            got = _rollout(env, seeds)
        after = env.worker_pids()
        assert after[0] == before[0] and after[1] != before[1], "only the killed worker is replaced"
        assert got[1].episodes == 4 and got[1].episodes_rerun >= 1
        assert "exited" in env.failures[1]
    finally:
        env.close()
    _assert_same(ref, got)
