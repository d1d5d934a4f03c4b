"""A CPU stand-in for ``torch.cuda.CUDAGraph``: run :class:`fastnft.loop.graphs.GraphedSampler`'s capture logic
on any device and check that what it captured reads only its static inputs and writes only its static outputs.

A CUDA graph records kernels on fixed memory: a replay re-reads whatever now sits in the captured input buffers
and overwrites the captured output buffers; nothing else the capture's Python touched is seen again. The stand-in
keeps exactly that contract with Python: ``capture(fn)`` calls ``fn()`` once and records the callable and its
output; ``replay()`` calls ``fn()`` again and copies the fresh result into the recorded output tensors in place
(same shapes and dtypes, or it raises). So a capture that closes over a caller's tensor instead of the static copy
(the first batch's observations, say), or returns a fresh tensor the caller never sees again, gives replays that
differ from eager calls, which the tests compare bit for bit. Random draws come from the generator passed to the
callable, as a registered CUDA generator advances per replay; the capture itself leaves the registered generator's
state as it found it (a real capture only records).

What it cannot show: host syncs (counted by :mod:`fastnft.testing.syncs`), allocations inside the graph, and
Python side effects that a real replay would skip (a replay here re-runs Python; on a GPU only kernels rerun).

    sampler = GraphedSampler(policy, "on", graphs=RecordingGraphs())
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["RecordedGraph", "RecordingGraphs"]


def _copy_into(dst: Any, src: Any, where: str = "output") -> None:
    """Copy ``src`` into ``dst``'s tensors in place, recursing into dataclasses, tuples, lists and dicts."""
    if isinstance(dst, Tensor):
        if not isinstance(src, Tensor) or src.shape != dst.shape or src.dtype != dst.dtype:
            raise RuntimeError(f"replay produced {where} {getattr(src, 'shape', src)!r} "
                               f"{getattr(src, 'dtype', '')}, the capture {tuple(dst.shape)} {dst.dtype}: a graph's "
                               "outputs have fixed shapes")
        dst.copy_(src)
    elif dataclasses.is_dataclass(dst):
        for f in dataclasses.fields(dst):
            if f.name.startswith("_"):
                continue
            _copy_into(getattr(dst, f.name), getattr(src, f.name), f"{where}.{f.name}")
    elif isinstance(dst, (tuple, list)):
        if len(dst) != len(src):
            raise RuntimeError(f"replay produced {len(src)} items in {where}, the capture {len(dst)}")
        for i, (d, s) in enumerate(zip(dst, src, strict=True)):
            _copy_into(d, s, f"{where}[{i}]")
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k], f"{where}[{k!r}]")
    elif dst is None and src is not None or dst is not None and dst != src and not callable(dst):
        raise RuntimeError(f"replay produced {where} = {src!r}, the capture {dst!r}")


class RecordedGraph:
    """The stand-in of one ``CUDAGraph``: ``replay()`` reruns the recorded callable into the captured output.

    Attributes:
        replays: how many times it was replayed.
    """

    def __init__(self, fn: Callable[[], Any], out: Any) -> None:
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self) -> None:
        """Rerun the captured callable and copy its result into the captured output tensors."""
        _copy_into(self.out, self.fn())
        self.replays += 1


class RecordingGraphs:
    """The three methods of :class:`fastnft.loop.graphs.CudaGraphs` on ``device_type`` (CPU by default; ``cuda``
    under :func:`fastnft.testing.fakecuda.fake_cuda`).

    Attributes:
        captured: every :class:`RecordedGraph`, in capture order. warmups: eager calls made before captures.
        registered: the generators registered with a capture (None where nothing was registered).
    """

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self.captured: list[RecordedGraph] = []
        self.registered: list[torch.Generator | None] = []
        self.warmups = 0

    def check(self) -> str | None:
        """Always usable."""
        return None

    def warmup(self, fn: Callable[[], Any], device: torch.device, n: int) -> None:
        """``n`` eager calls (the side stream of a GPU)."""
        for _ in range(n):
            fn()
            self.warmups += 1

    def capture(self, fn: Callable[[], Any], generator: torch.Generator | None, pool=None) -> tuple[RecordedGraph, Any]:
        """Call ``fn()`` once (the capture) and record it. A capture only records kernels: the registered
        generator's state is restored afterwards, so the first replay draws what an eager call would."""
        state = generator.get_state() if generator is not None else None
        out = fn()
        if generator is not None:
            generator.set_state(state)
        graph = RecordedGraph(fn, out)
        self.captured.append(graph)
        self.registered.append(generator)
        return graph, out
