"""One context manager that is both a step timer (a metric) and an NVTX range named ``group/phase``.

    timers = PhaseTimers()
    with timers.range("rollout/sample"):
        ...
    timers.summary()  # {"time/rollout/sample": seconds, ...}

NVTX ranges come from the ``nvtx`` package (a no-op without a GPU profiler attached); ``torch.cuda.nvtx`` is not
used because it raises on CPU builds of torch. Ranges are emitted only while ``enabled`` (switch them on for the
capture window; see profiling/README.md). GPU work is synchronised before a timer stops only when
``sync_cuda`` is set, since synchronising costs throughput.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

try:  # pragma: no cover - import guard
    import nvtx as _nvtx
except ImportError:  # pragma: no cover
    _nvtx = None

__all__ = ["PhaseTimers"]


class PhaseTimers:
    """Accumulates wall time per named phase and mirrors each phase as an NVTX range.

    Args:
        nvtx_enabled: emit NVTX push/pop around each phase; None = from the ``FASTNFT_NVTX`` environment variable.
        sync_cuda: call ``torch.cuda.synchronize()`` at both ends of a phase for exact GPU timings.
    """

    def __init__(self, nvtx_enabled: bool | None = None, sync_cuda: bool = False) -> None:
        if nvtx_enabled is None:  # switched on for an Nsight capture: FASTNFT_NVTX=1 (profiling/README.md)
            nvtx_enabled = os.environ.get("FASTNFT_NVTX", "0") == "1"
        self.nvtx_enabled = nvtx_enabled and _nvtx is not None
        self.sync_cuda = sync_cuda and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def range(self, name: str) -> Iterator[None]:
        """Time the block under ``name`` (``group/phase``) and wrap it in an NVTX range."""
        if self.sync_cuda:
            torch.cuda.synchronize()
        if self.nvtx_enabled:
            _nvtx.push_range(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync_cuda:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1
            if self.nvtx_enabled:
                _nvtx.pop_range()

    def summary(self, reset: bool = True) -> dict[str, float]:
        """``{"time/<name>": seconds}`` accumulated since the last reset."""
        out = {f"time/{k}": v for k, v in self.totals.items()}
        if reset:
            self.totals.clear()
            self.counts.clear()
        return out
