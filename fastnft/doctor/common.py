"""What every doctor check module shares: the skip exception and the CUDA requirement."""

from __future__ import annotations

import torch

__all__ = ["NO_CUDA", "Skip", "need_cuda"]

NO_CUDA = "no CUDA device visible (torch.cuda.is_available() is False)"


class Skip(Exception):
    """The check cannot run here; the message is the reason shown in the table."""


def need_cuda(n: int = 1) -> torch.device:
    """``cuda:0``, or :class:`Skip` without ``n`` visible CUDA devices."""
    if not torch.cuda.is_available():
        raise Skip(NO_CUDA)
    if torch.cuda.device_count() < n:
        raise Skip(f"needs {n} CUDA devices, {torch.cuda.device_count()} visible")
    return torch.device("cuda", 0)
