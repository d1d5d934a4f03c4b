"""Helpers of the bandit tests (a plain module: ``conftest`` is not importable by name when the whole suite runs,
tests/kernels has its own conftest.py). Why one torch thread: tests/conftest.py's docstring."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# The bandit SFT start: what both bandit modules assert their start success rate on (0.25 < start < 0.7).
BANDIT_SFT_OVERRIDES = ["sft.steps=400", "sft.num_demos=1024"]
BANDIT_THREADS = 1  # torch threads of the bandit SFT and trainings (tests/conftest.py's docstring)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``; the previous count is restored after it."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
