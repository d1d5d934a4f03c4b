"""ManiSkill GPU backend seeding (issue 16, G4): equal seeds must give equal initial states.

mani_skill 3.0.1 seeds a batched GPU reset with the first seed only (``torch.manual_seed(episode_seed[0])`` around
``_initialize_episode``) and PickCube draws every reset env's pose in one batched draw, so ``reset(seed=[5, 5, 7,
7])`` gave four different initial states and the group baseline / GRPO subtracted means over unrelated states.
:class:`BatchedSeedingStub` implements that rule on CPU; the GPU test (skipped without CUDA) checks the real scene.
Until the GPU test has passed, grouped rollouts on the GPU backend are refused.
"""

from __future__ import annotations

import pytest
import torch

from fastnft.config import ConfigError, load_config
from fastnft.envs.maniskill import ManiSkillVectorEnv, check_grouped_seeding


class BatchedSeedingStub:
    """mani_skill 3.0.1's seeding rule for a batched GPU scene, on CPU: the first reset reconfigures (all envs at
    once); every reset seeds torch from ``seed[0]`` and draws the reset envs' states in one batched draw."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.state = torch.zeros(num_envs, 3)
        self.reconfigured = False
        self.calls: list[tuple[list[int], list[int]]] = []
        self.unwrapped = self

    def reset(self, seed=None, options=None):
        options = options or {}
        idx = [int(i) for i in options.get("env_idx", range(self.num_envs))]
        if not self.reconfigured and len(idx) != self.num_envs:
            raise RuntimeError("Cannot do a partial reset and reconfigure the environment")  # ManiSkill's rule
        self.reconfigured = True
        seeds = list(seed) if seed is not None else [0]
        self.calls.append((seeds, idx))
        with torch.random.fork_rng():
            torch.manual_seed(seeds[0])  # sapien_env.py: torch.manual_seed(self._episode_seed[0])
            self.state[idx] = torch.rand(len(idx), 3)  # PickCube: one batched draw for the reset envs
        return self.state.clone(), {}

    def get_info(self):
        return {}

    def get_obs(self, info):
        return self.state.clone()


def _stub_env(n: int) -> ManiSkillVectorEnv:
    env = object.__new__(ManiSkillVectorEnv)  # the real reset logic over the stub scene (no simulator)
    env.num_envs, env.obs_dim, env.act_dim, env.max_episode_steps = n, 3, 1, 5
    env.rgb, env.device, env._pool = False, torch.device("cpu"), None
    env._gpu_env, env._gpu_scene_ready = BatchedSeedingStub(n), False
    return env


def test_equal_seeds_give_equal_initial_states_on_the_batched_scene():
    env = _stub_env(4)
    obs = env._reset_slots([0, 1, 2, 3], [5, 5, 7, 7])
    assert torch.equal(obs[0], obs[1]) and torch.equal(obs[2], obs[3])
    assert not torch.equal(obs[0], obs[2])
    again = env._reset_slots([0, 1, 2, 3], [7, 5, 5, 7])  # a later reset: no reconfiguration, the same state per seed
    assert torch.equal(again[0], obs[2]) and torch.equal(again[1], obs[0]) and torch.equal(again[3], obs[2])
    assert env._gpu_env.calls[-1] == ([7] * 4, [3])  # one env per reset call, its seed in every slot


def test_the_stub_implements_the_batched_rule():
    """The stub reproduces the bug: one batched reset with equal seeds gives different states."""
    stub = BatchedSeedingStub(4)
    state, _ = stub.reset(seed=[5, 5, 7, 7])
    assert not torch.equal(state[0], state[1])


def test_grouped_rollouts_are_refused_on_the_gpu_backend():
    base = "configs/pickcube_stepnft.yaml"  # the PickCube recipe: group baseline, group_size 8
    with pytest.raises(ConfigError, match=r"env.sim_backend.*measured on a GPU"):
        load_config(base, ["env.sim_backend=gpu"])
    with pytest.raises(ConfigError, match=r"env.sim_backend"):
        load_config(base, ["env.sim_backend=gpu", "nft.baseline=batch", "algo=grpo", "nft.target=next"])
    load_config(base, ["env.sim_backend=gpu", "nft.baseline=batch"])  # ungrouped: allowed
    load_config(base, ["env.sim_backend=cpu"])
    with pytest.raises(ValueError, match="auto resolved to gpu"):
        check_grouped_seeding("gpu", grouped=True)
    check_grouped_seeding("cpu", grouped=True)
    check_grouped_seeding("gpu", grouped=False)


@pytest.mark.gpu
@pytest.mark.maniskill
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the PhysX-GPU backend needs a CUDA GPU")
def test_equal_seeds_give_equal_rows_on_the_gpu_scene():
    from fastnft.config import EnvConfig
    from fastnft.envs.maniskill import vulkan_available

    ok, why = vulkan_available()
    if not ok:
        pytest.skip(why)
    env = ManiSkillVectorEnv(EnvConfig(sim_backend="gpu", max_episode_steps=20), num_envs=4)
    try:
        for _ in range(2):  # the first reset (reconfiguring) and a later one
            obs = env.reset([5, 5, 7, 7]).cpu()
            assert torch.allclose(obs[0], obs[1], atol=1e-5) and torch.allclose(obs[2], obs[3], atol=1e-5)
            assert not torch.allclose(obs[0], obs[2], atol=1e-3)
    finally:
        env.close()
