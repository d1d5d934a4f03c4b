"""Observation / action normalisation statistics estimated from demonstrations, and the state policy's processor.

As in lerobot, normalisation is a processor step outside the network: :class:`StateProcessor` holds the statistics
and maps raw observations in and normalised actions out; the network sees normalised tensors only, and its
``state_dict`` holds weights only (the statistics travel beside it in the policy file).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Normalizer", "StateProcessor"]


class Normalizer(nn.Module):
    """Affine z-score normalisation ``(x - mean) / std`` with a floor on ``std``, stored as buffers.

    Args:
        mean: ``[dim]`` float32.
        std: ``[dim]`` float32 (floored at ``min_std`` so constant features do not blow up).
    """

    def __init__(self, mean: Tensor, std: Tensor, min_std: float = 1e-2) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clamp(min=min_std).clone())

    @classmethod
    def fit(cls, x: Tensor, min_std: float = 1e-2) -> Normalizer:
        """Estimate statistics from ``x: [M, dim]``."""
        return cls(x.float().mean(0), x.float().std(0), min_std=min_std)

    @classmethod
    def identity(cls, dim: int) -> Normalizer:
        """No-op normaliser of width ``dim``."""
        return cls(torch.zeros(dim), torch.ones(dim), min_std=0.0)

    def normalize(self, x: Tensor) -> Tensor:
        """``[..., dim] -> [..., dim]`` in normalised units."""
        return (x - self.mean) / self.std

    def unnormalize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`normalize`."""
        return x * self.std + self.mean


class StateProcessor:
    """The state policy's processor: ``[N, obs_dim]`` raw state -> normalised, normalised ``[..., act_dim]`` actions
    <-> env units (z-scores from the demonstrations). Not a submodule: its statistics are no network weights, so
    they stay out of ``state_dict``, ZeRO and the EMA; the owning policy moves them with itself (``_apply``).

    Args:
        obs_norm: ``[obs_dim]`` statistics of the observations.
        act_norm: ``[act_dim]`` statistics of the actions.
    """

    def __init__(self, obs_norm: Normalizer, act_norm: Normalizer) -> None:
        self.obs_norm, self.act_norm = obs_norm, act_norm

    def apply_(self, fn) -> StateProcessor:
        """Apply a tensor function (``nn.Module._apply``'s: device / dtype moves) to every statistic, in place."""
        self.obs_norm._apply(fn)
        self.act_norm._apply(fn)
        return self

    def normalize_obs(self, obs: Tensor) -> Tensor:
        """``[..., obs_dim]`` raw -> normalised (fp32)."""
        return self.obs_norm.normalize(obs.float())

    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Env actions ``[..., act_dim]`` -> normalised (fp32)."""
        return self.act_norm.normalize(actions.float())

    def unnormalize_actions(self, x: Tensor) -> Tensor:
        """Normalised ``[..., act_dim]`` -> env actions (fp32)."""
        return self.act_norm.unnormalize(x.float())

    def state_dict(self) -> dict[str, Tensor]:
        """``{"obs_norm.mean", "obs_norm.std", "act_norm.mean", "act_norm.std"}`` (CPU copies)."""
        return {f"{n}.{k}": getattr(getattr(self, n), k).detach().cpu().clone()
                for n in ("obs_norm", "act_norm") for k in ("mean", "std")}

    @classmethod
    def from_state_dict(cls, d: dict[str, Tensor]) -> StateProcessor:
        """Inverse of :meth:`state_dict` (the statistics are taken as they are: no new ``std`` floor).

        Raises:
            KeyError: a statistic is missing (the message names it).
        """
        missing = [k for k in ("obs_norm.mean", "obs_norm.std", "act_norm.mean", "act_norm.std") if k not in d]
        if missing:
            raise KeyError(f"state processor statistics {missing} are missing from the policy file")
        return cls(*(Normalizer(d[f"{n}.mean"], d[f"{n}.std"], min_std=0.0) for n in ("obs_norm", "act_norm")))
