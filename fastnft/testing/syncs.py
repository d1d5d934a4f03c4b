"""Count the host syncs a block of code would force on a GPU, on any device (CPU included).

A host sync is an op whose result the host must wait for: the CPU stalls until the GPU queue drains, which
serialises the GPU's work with Python and breaks CUDA-graph capture. On a CPU nothing stalls, but the same ops
run, so counting them on CPU tells what a GPU run would pay. :class:`SyncCounter` is a ``TorchFunctionMode`` that
counts, by kind:

* ``nonzero``: ``nonzero``, ``argwhere``, ``torch.where(cond)`` (one argument), ``masked_select``;
* ``unique``: ``unique``, ``unique_consecutive``;
* ``mask_index``: indexing a tensor (read or write) with a boolean tensor (its size depends on the data);
* ``repeat_interleave``: ``repeat_interleave`` with tensor repeats and no ``output_size``;
* ``item``: ``.item()``; ``tolist``: ``.tolist()``; ``bool`` / ``int`` / ``float``: ``bool(t)``, ``int(t)``
  (``__index__`` included, so ``range(t)`` counts), ``float(t)``.

Ops that a counted op runs internally are not counted again (the mode is off while it handles one).

    with SyncCounter() as syncs:
        policy.sample(obs)
    assert syncs.total <= 3, syncs.report()

Limits: device-to-host copies (``.cpu()``, ``.numpy()``, ``.to("cpu")``) are not counted (on a CPU they are
no-ops and cannot be told apart), nor are syncs inside custom C++/CUDA extensions.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SyncCounter"]

_T = torch.Tensor
_KIND = {
    torch.nonzero: "nonzero", _T.nonzero: "nonzero", torch.argwhere: "nonzero", _T.argwhere: "nonzero",
    torch.masked_select: "nonzero", _T.masked_select: "nonzero",
    torch.unique: "unique", _T.unique: "unique", torch.unique_consecutive: "unique",
    _T.unique_consecutive: "unique",
    _T.item: "item", _T.tolist: "tolist", _T.__bool__: "bool", _T.__int__: "int", _T.__index__: "int",
    _T.__float__: "float",
}
_INDEX = (_T.__getitem__, _T.__setitem__, _T.index_put, _T.index_put_, torch.index_put)
_WHERE = (torch.where, _T.where)
_REPEAT = (torch.repeat_interleave, _T.repeat_interleave)


def _has_bool_index(idx: Any) -> bool:
    if isinstance(idx, torch.Tensor):
        return idx.dtype == torch.bool and idx.dim() > 0 or False
    if isinstance(idx, (tuple, list)):
        return any(_has_bool_index(i) for i in idx)
    return False


def _kind(func, args: tuple, kwargs: dict) -> str | None:
    kind = _KIND.get(func)
    if kind is not None:
        return kind
    if func in _INDEX and len(args) > 1 and _has_bool_index(args[1]):
        return "mask_index"
    if func in _WHERE and len(args) + len(kwargs) == 1:
        return "nonzero"
    if func in _REPEAT and kwargs.get("output_size") is None:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if func is torch.repeat_interleave
                                                             and len(args) == 1 else None)
        if isinstance(repeats, torch.Tensor) and repeats.numel() > 1:
            return "repeat_interleave"
    return None


class SyncCounter(TorchFunctionMode):
    """A ``TorchFunctionMode`` counting host-sync ops by kind (see the module docstring for the list).

    Attributes:
        counts: ``Counter`` of kind -> number of calls seen inside the block.
        sites: kind -> ``Counter`` of ``"file:line"`` call sites (the innermost frame outside torch), kept
            when ``record_sites`` (default True) for :meth:`report`.
    """

    def __init__(self, record_sites: bool = True) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sites: dict[str, Counter[str]] = {}
        self.record_sites = record_sites
        self._paused = 0

    @property
    def total(self) -> int:
        """All syncs counted so far."""
        return sum(self.counts.values())

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Count nothing inside the block (code that is not under test: a CPU env, a CPU stand-in kernel)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def reset(self) -> None:
        """Forget everything counted so far."""
        self.counts.clear()
        self.sites.clear()

    def report(self) -> str:
        """One line per kind with its count and call sites, most frequent first."""
        lines = [f"{self.total} host syncs"]
        for kind, n in self.counts.most_common():
            where = ", ".join(f"{s} x{c}" for s, c in self.sites.get(kind, Counter()).most_common(6))
            lines.append(f"  {kind}: {n}  {where}")
        return "\n".join(lines)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None if self._paused else _kind(func, args, kwargs)
        if kind is not None:
            self.counts[kind] += 1
            if self.record_sites:
                self.sites.setdefault(kind, Counter())[_site()] += 1
        return func(*args, **kwargs)


def _site() -> str:
    for frame in reversed(traceback.extract_stack(limit=12)[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}"
    return "?"
