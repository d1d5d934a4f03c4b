"""Observation / action normalisation statistics estimated from demonstrations."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Normalizer"]


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
