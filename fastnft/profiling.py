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

__all__ = ["PhaseTimers", "ProfileWindow"]


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


class ProfileWindow:
    """``--profile-steps a:b``: iterations ``a .. b-1`` (0-based) run between ``cudaProfilerStart`` and
    ``cudaProfilerStop``, so ``nsys profile --capture-range=cudaProfilerApi`` records exactly them.

    Iteration 0 is never inside the window: it captures the CUDA graphs and compiles the Triton kernels (warm-up).
    Without CUDA the window only records which iterations it would cover.

    Args:
        spec: ``"a:b"`` with ``1 <= a < b``, or None (no window).

    Raises:
        ValueError: a malformed spec or ``a < 1`` (the message names the fix).
    """

    def __init__(self, spec: str | None) -> None:
        self.start = self.stop = None
        self.active = False
        self.profiled: list[int] = []
        if spec is None:
            return
        parts = spec.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"--profile-steps must look like a:b (iterations a..b-1), got {spec!r}")
        a, b = int(parts[0]), int(parts[1])
        if not 1 <= a < b:
            raise ValueError(f"--profile-steps {spec}: need 1 <= a < b; iteration 0 is warm-up (graph capture, "
                             "kernel compilation), so start at 1 or later")
        self.start, self.stop = a, b

    def _profiler(self, on: bool) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the window's edges fall between iterations, not inside queued work
            (torch.cuda.profiler.start if on else torch.cuda.profiler.stop)()

    def before(self, it: int) -> None:
        """Call before iteration ``it``: opens the window at ``a``."""
        if self.start is not None and it == self.start:
            self._profiler(True)
            self.active = True
        if self.active:
            self.profiled.append(it)

    def after(self, it: int) -> None:
        """Call after iteration ``it``: closes the window after ``b - 1`` (or the last iteration)."""
        if self.active and it + 1 >= self.stop:
            self.close()

    def close(self) -> None:
        """Close the window if open (end of training)."""
        if self.active:
            self._profiler(False)
            self.active = False
