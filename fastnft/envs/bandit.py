"""Synthetic contextual bandit: one action chunk per episode, success iff it lands in a target region.

Context ``c ~ N(0, I_obs_dim)`` (drawn from the episode seed). The episode lasts exactly one chunk of ``chunk``
env steps; it succeeds iff the mean over the chunk of action dim 0 lies within ``radius`` of ``tanh(c_0)``.
It isolates the algorithm from the simulator: StepNFT must raise its success rate within seconds, and must not
with shuffled labels (tests/test_bandit_stepnft.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnft.envs.base import VectorEnv

__all__ = ["BanditEnv", "bandit_target"]


def bandit_target(obs: Tensor) -> Tensor:
    """Target of the chunk-mean first action: ``tanh(c_0)``. ``obs: [N, obs_dim] -> [N]``."""
    return torch.tanh(obs[:, 0])


class BanditEnv(VectorEnv):
    """N independent bandit episodes in lockstep (CPU tensors).

    Args:
        num_envs: N.
        chunk: env steps per episode (set it to the policy's executed chunk C).
        obs_dim: context width (default 4).
        act_dim: action width (default 2).
        radius: success radius around the target (default 0.3).
    """

    def __init__(self, num_envs: int, chunk: int = 4, obs_dim: int = 4, act_dim: int = 2, radius: float = 0.3) -> None:
        super().__init__()
        if chunk < 1 or num_envs < 1:
            raise ValueError(f"BanditEnv needs num_envs >= 1 and chunk >= 1, got {num_envs}, {chunk}")
        self.num_envs, self.obs_dim, self.act_dim = num_envs, obs_dim, act_dim
        self.max_episode_steps = chunk
        self.radius = radius
        self.action_low = torch.full((act_dim,), -3.0)
        self.action_high = torch.full((act_dim,), 3.0)
        self._ctx = torch.zeros(num_envs, obs_dim)
        self._sum = torch.zeros(num_envs)
        self._t = 0

    def _reset(self, seeds: list[int]) -> Tensor:
        rows = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            rows.append(torch.randn(self.obs_dim, generator=g))
        self._ctx = torch.stack(rows)
        self._sum = torch.zeros(self.num_envs)
        self._t = 0
        return self._ctx.clone()

    def _step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._sum += actions[:, 0]
        self._t += 1
        if self._t >= self.max_episode_steps:
            hit = (self._sum / self.max_episode_steps - bandit_target(self._ctx)).abs() < self.radius
        else:
            hit = torch.zeros(self.num_envs, dtype=torch.bool)
        return self._ctx.clone(), hit.float(), hit
