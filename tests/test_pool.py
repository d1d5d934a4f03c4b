"""The CPU worker pool and the queue rollout on a toy simulator (tests/pool_sims.py): a whole chunk per round trip,
finished episodes not stepped, per-episode outcomes independent of workers and slots, dead workers replaced."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from fastnft.config import NFTConfig, PolicyConfig
from fastnft.envs.pool import PooledEnv, WorkerPool, clean_stale_dirs, pool_base_dir
from fastnft.loop.rollout import run_episodes
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule

SIMS = str(Path(__file__).with_name("pool_sims.py"))


class LineEnv(PooledEnv):
    def __init__(self, num_envs: int, num_workers: int, max_steps: int = 12, **sim_kwargs) -> None:
        super().__init__()
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = num_envs, 3, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self._pool = WorkerPool(("file", SIMS, "LineSim"), sim_kwargs, num_envs, num_workers, max_steps)

    def _episode(self, slot: int, seed: int) -> dict:
        return {"seed": int(seed)}

    def _pool_obs(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self._pool.arrays["state"]))

    def close(self) -> None:
        self._pool.close()


def _policy() -> StateFlowPolicy:
    torch.manual_seed(0)
    return StateFlowPolicy(3, 2, PolicyConfig(horizon=6, n_action_steps=4, width=16, depth=1, heads=2, num_steps=4))


def _rollout(env, seeds, gen_seed=0, steps_per_call=2):
    return run_episodes(_policy(), env, flow_sde_schedule(4, 0.5), seeds, stochastic=True, record=True,
                        generator=torch.Generator().manual_seed(gen_seed), nft=NFTConfig(steps_per_call=steps_per_call))


def _same(a, b) -> None:
    (buf_a, st_a), (buf_b, st_b) = a, b
    assert st_a.episode_success.tolist() == st_b.episode_success.tolist()
    assert st_a.episode_steps.tolist() == st_b.episode_steps.tolist()
    assert torch.equal(st_a.episode_score, st_b.episode_score)
    for name in ("obs", "x_t", "v_old", "x_next", "x0", "step", "y", "episode"):
        assert torch.equal(getattr(buf_a, name), getattr(buf_b, name)), name


def test_chunk_runs_in_the_worker_and_stops_each_slot_at_its_end():
    env = LineEnv(3, 2, max_steps=5)
    try:
        env.reset([0, 6, 3])  # x0 = 0, 6/7, 3/7
        res = env.step_chunk(torch.ones(3, 4, 2))  # +0.1 per step: seed 6 succeeds at its 2nd step
        assert res.steps.tolist() == [4, 2, 4] and res.done.tolist() == [False, True, False]
        assert res.success_once.tolist() == [False, True, False]
        assert res.obs[:, 1].tolist() == [4.0, 2.0, 4.0]  # the obs after each slot's last step
        res = env.step_chunk(torch.ones(3, 4, 2))
        assert res.steps.tolist() == [1, 0, 1], "the time limit stops a slot; a finished slot is not stepped"
        assert env.sim_steps == 12 and res.done.all()
        obs = env.reset_slots([1], [1])  # one slot starts again while the others keep their state
        assert obs[:, 0].tolist() == [0.0, 1.0, 3.0] and env.done.tolist() == [True, False, True]
    finally:
        env.close()


def test_episodes_do_not_depend_on_workers_slots_or_finishing_order():
    """The same 16 episodes with 1 worker x 3 slots and 2 workers x 4 slots: identical per-episode records (the
    slots take episodes from a queue, so episodes land in different slots and finish in another order)."""
    seeds = [s // 2 for s in range(16)]  # two rollouts per initial state
    runs = []
    for slots, workers in ((3, 1), (8, 2)):
        env = LineEnv(slots, workers)
        try:
            runs.append(_rollout(env, seeds))
        finally:
            env.close()
    _same(runs[0], runs[1])
    assert 0 < int(runs[0][1].episode_success.sum()) < 16, "the toy task should have both outcomes"
    assert len(set(runs[0][1].episode_steps.tolist())) > 1, "episodes should end at different times"
    # The noise is the episode's own: another key changes the outcomes, two rollouts of one seed differ.
    other = LineEnv(8, 2)
    try:
        buf_c, _ = _rollout(other, seeds, gen_seed=1)
    finally:
        other.close()
    assert not torch.equal(buf_c.x0[:4], runs[0][0].x0[:4])
    b = runs[0][0]
    assert not torch.equal(b.x0[b.episode == 0][0], b.x0[b.episode == 1][0])


def test_policy_rows_do_not_depend_on_their_batch():
    """The premise of the rollout's row padding: a row's sample is the same bits in any batch of a multiple of 8."""
    policy = _policy().eval()
    obs, noise = torch.randn(24, 3), torch.randn(24, 5, 6, 2)
    sch = flow_sde_schedule(4, 0.5)
    full = policy.sample(obs, sch, stochastic=True, step_index=torch.zeros(24, dtype=torch.long), noise=noise)
    for lo, hi in ((0, 8), (8, 16), (8, 24)):
        part = policy.sample(obs[lo:hi], sch, stochastic=True, step_index=torch.zeros(hi - lo, dtype=torch.long),
                             noise=noise[lo:hi])
        assert torch.equal(part.actions, full.actions[lo:hi]), (lo, hi)
    perm = torch.randperm(8)
    shuffled = policy.sample(obs[:8][perm], sch, stochastic=True, step_index=torch.zeros(8, dtype=torch.long),
                             noise=noise[:8][perm])
    assert torch.equal(shuffled.actions, full.actions[:8][perm])


def test_a_killed_worker_is_replaced_and_its_episodes_rerun_with_the_same_noise():
    seeds = list(range(8))
    ref_env = LineEnv(4, 2)
    try:
        ref = _rollout(ref_env, seeds)
    finally:
        ref_env.close()
    env = LineEnv(4, 2)
    calls = {"n": 0}
    real = env.step_chunk

    def kill_on_third(actions):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(env.worker_pids()[0], signal.SIGKILL)  # mid-rollout: its slots hold running episodes
        return real(actions)

    env.step_chunk = kill_on_third  # type: ignore[method-assign]
    try:
        with pytest.warns(RuntimeWarning, match="rerunning it from its seed"):
            got = _rollout(env, seeds)
        assert env._pool.restarts == 1 and got[1].episodes_rerun >= 1
        assert got[1].episodes == 8
        assert all(_alive(p) for p in env.worker_pids())
    finally:
        env.close()
    _same(ref, got)


def test_a_simulator_crash_once_is_rerun(tmp_path):
    seeds = list(range(6))
    ref_env = LineEnv(2, 2)
    try:
        ref = _rollout(ref_env, seeds)
    finally:
        ref_env.close()
    env = LineEnv(2, 2, crash_seed=3, marker=str(tmp_path / "crashed"))
    try:
        with pytest.warns(RuntimeWarning, match="episode 3 .seed 3. lost"):
            got = _rollout(env, seeds)
        assert got[1].episodes_rerun == 1 and env._pool.restarts == 1
        assert any("simulated PhysX failure at seed 3" in why for why in env.failures.values())
    finally:
        env.close()
    _same(ref, got)


def test_the_same_episode_failing_three_times_stops_with_its_seed_and_the_log():
    env = LineEnv(2, 2, crash_seed=3)
    try:
        with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError) as err:
            _rollout(env, list(range(6)))
    finally:
        env.close()
    msg = str(err.value)
    assert "seed 3" in msg and "lost 3 times" in msg
    assert "simulated PhysX failure at seed 3" in msg, "the worker's last log lines belong in the message"


def test_pool_folders_are_removed_on_close_and_after_a_kill():
    env = LineEnv(2, 1)
    folder = env._pool.folder
    assert folder.is_dir() and folder.parent == pool_base_dir()
    env.close()
    assert not folder.exists()
    # a folder left by a killed run (its pid no longer exists) is removed by the next pool
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = pool_base_dir() / f"fastnft-pool-{dead}-test"
    stale.mkdir()
    (stale / "worker0.1.log").write_text("x")
    mine = pool_base_dir() / f"fastnft-pool-{os.getpid()}-test"
    mine.mkdir()
    try:
        assert stale in clean_stale_dirs(pool_base_dir())
        assert not stale.exists() and mine.exists(), "only folders of processes that are gone are removed"
    finally:
        mine.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
