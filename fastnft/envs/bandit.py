"""Synthetic contextual bandit: one action chunk per episode, success iff it lands in a target region.

Context ``c ~ N(0, I_obs_dim)`` (drawn from the episode seed). The episode lasts exactly one chunk of ``chunk``
env steps; it succeeds iff the mean over the chunk of action dim 0 lies within ``radius`` of ``tanh(c_0)``.
It isolates the algorithm from the simulator: StepNFT must raise its success rate within seconds, and must not
with shuffled labels (tests/test_bandit_stepnft.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastnft.chunks import ChunkDataset
from fastnft.envs.base import VectorEnv

__all__ = ["BanditEnv", "bandit_target"]


def bandit_target(obs: Tensor) -> Tensor:
    """Target of the chunk-mean first action: ``tanh(c_0)``. ``obs: [N, obs_dim] -> [N]``."""
    return torch.tanh(obs[:, 0])


class BanditEnv(VectorEnv):
    """N independent bandit episodes in lockstep (CPU tensors).

    Args:
        num_envs: N.
        chunk: env steps per episode (set it to the policy's executed steps, ``policy.n_action_steps``).
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


def bandit_demo_dataset(num: int, chunk: int, seed: int = 0, offset_std: float = 0.6, obs_dim: int = 4,
                        act_dim: int = 2) -> ChunkDataset:
    """Synthetic demonstrations for the bandit: chunk dim 0 = ``tanh(c_0) + offset`` with one offset
    ``~ N(0, offset_std^2)`` shared by the chunk (so an SFT policy lands in the radius ~40 % of the time), other
    dims ``N(0, 0.3^2)``.

    Returns:
        :class:`fastnft.chunks.ChunkDataset` with ``num`` chunks ``[num, chunk, act_dim]`` and no padding.
    """
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(num, obs_dim, generator=g)
    off = offset_std * torch.randn(num, 1, generator=g)
    a0 = (bandit_target(obs)[:, None] + off).expand(num, chunk)
    rest = 0.3 * torch.randn(num, chunk, act_dim - 1, generator=g)
    actions = torch.cat([a0[..., None], rest], dim=-1)
    return ChunkDataset(obs=obs, actions=actions, is_pad=torch.zeros(num, chunk, dtype=torch.bool))
