"""Supervised pairs (observation, action chunk) for few-shot flow-matching SFT, built from demonstration episodes.

A bottom-floor data type: the demonstration files (:mod:`fastnft.experiments.demos`), the SFT stage
(:mod:`fastnft.experiments.sft`) and synthetic envs (:mod:`fastnft.envs.bandit`) all speak it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ChunkDataset", "chunks_from_episodes"]


@dataclass
class ChunkDataset:
    """Supervised pairs (observation, action chunk).

    Attributes:
        obs: ``[M, obs_dim]`` float32 raw observations.
        actions: ``[M, H, act_dim]`` float32 raw env actions starting at that observation.
        is_pad: ``[M, H]`` bool, True where the chunk ran past the episode end (padded with the last action,
            excluded from the loss).
    """

    obs: Tensor
    actions: Tensor
    is_pad: Tensor

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def chunks_from_episodes(episodes: Sequence[tuple[np.ndarray, np.ndarray]], horizon: int) -> ChunkDataset:
    """One chunk per time step of every episode.

    Args:
        episodes: ``(obs [T+1 or T, obs_dim], actions [T, act_dim])`` per episode.
        horizon: H.

    Raises:
        ValueError: an episode with no actions, or observations shorter than the actions.
    """
    obs_l, act_l, pad_l = [], [], []
    for k, (obs, act) in enumerate(episodes):
        obs, act = np.asarray(obs, np.float32), np.asarray(act, np.float32)
        T = act.shape[0]
        if T == 0 or obs.shape[0] < T:
            raise ValueError(f"demo episode {k}: needs >= 1 action and one observation per action, "
                             f"got obs {obs.shape} actions {act.shape}")
        idx = np.arange(T)[:, None] + np.arange(horizon)[None, :]
        pad = idx >= T
        obs_l.append(obs[:T])
        act_l.append(act[np.minimum(idx, T - 1)])
        pad_l.append(pad)
    return ChunkDataset(obs=torch.from_numpy(np.concatenate(obs_l)), actions=torch.from_numpy(np.concatenate(act_l)),
                        is_pad=torch.from_numpy(np.concatenate(pad_l)))
