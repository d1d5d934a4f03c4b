"""Fake CUDA on a CPU-only machine: run fastnft's device logic on ``cuda`` tensors that carry no values.

``torch._subclasses.fake_tensor.FakeTensorMode`` gives every tensor a device and a shape but no data, and it raises
``FakeTensorDeviceMismatchError`` whenever an op mixes devices, so code run under :func:`fake_cuda` fails exactly
where it would mix CPU and CUDA tensors on a GPU. Four gaps of FakeTensorMode on a CPU build of torch are closed
here, each in the narrowest way:

* **Generators.** A CUDA ``torch.Generator`` cannot be built without CUDA, and FakeTensorMode ignores generators.
  Inside :func:`fake_cuda`, ``torch.Generator(device="cuda...")`` returns a :class:`FakeCudaGenerator` (a CPU
  generator that reports ``cuda:i``), a CPU generator stays a CPU generator, and every draw that passes
  ``generator=`` is audited: a generator whose device type differs from the drawn tensor's is recorded in
  :attr:`FakeCuda.generator_mismatches` (the generator check).
* **Python indexing.** ``x[...]`` / ``x[...] = v`` on a fake CUDA tensor takes a CUDA device guard that a CPU build
  lacks; they are translated to the equivalent aten ops (``select``, ``slice``, ``unsqueeze``, ``index``). A
  boolean mask has a data-dependent size; it selects every row (its device is still checked).
* **Host syncs.** ``.item()``, ``float(t)``, ``bool(t)``, ``int(t)`` have no value to return; they answer ``True``
  for bool, ``1`` for integers (so size checks such as the trainer's buffer trim take their branch) and ``0.5``
  for floats, and are counted in :attr:`FakeCuda.host_syncs`. ``nonzero()`` of a 1-D mask (data-dependent size)
  returns every index, like a boolean mask, and is counted too.
* **CUDA queries.** ``torch.cuda.is_available()`` is True, ``device_count()`` is ``num_gpus`` and
  ``get_device_capability()`` is ``capability`` for every caller outside torch itself (FakeTensorMode must keep
  seeing that no real CUDA exists).

    with fake_cuda() as fc:
        trainer = StepNFTTrainer(cfg_with_device_cuda, policy, env)   # a stand-in engine: DeepSpeed needs a GPU
        trainer.iteration(0)
    assert not fc.generator_mismatches

Fake tensors carry no values: feed synthetic observations and check devices, dtypes and shapes, never numbers.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["FakeCuda", "FakeCudaGenerator", "fake_cuda"]

_aten = torch.ops.aten
_RealGenerator = torch.Generator


class FakeCudaGenerator(_RealGenerator):
    """A CPU generator that reports a CUDA device (what ``torch.Generator(device="cuda")`` returns in fake mode)."""

    def __new__(cls, device: torch.device) -> FakeCudaGenerator:  # noqa: PYI034 (a C type: no typing.Self)
        obj = _RealGenerator.__new__(cls)  # a CPU generator underneath
        obj._fake_device = device
        return obj

    def __init__(self, device: torch.device) -> None:  # state set in __new__ (the C type takes no device here)
        pass

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return self._fake_device


class _AnyGenerator(type(_RealGenerator)):
    """Metaclass: ``isinstance(g, torch.Generator)`` stays true for every generator while the factory is patched."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, _RealGenerator)


class _GeneratorFactory(_RealGenerator, metaclass=_AnyGenerator):
    """Stands in for ``torch.Generator`` inside :func:`fake_cuda`: CUDA requests get a :class:`FakeCudaGenerator`."""

    def __new__(cls, device: Any = "cpu") -> torch.Generator:  # type: ignore[misc]
        dev = torch.device(device)
        if dev.type == "cuda":
            return FakeCudaGenerator(torch.device("cuda", dev.index or 0))
        return _RealGenerator(device=dev)


@dataclass
class FakeCuda:
    """What a :func:`fake_cuda` block observed.

    Attributes:
        host_syncs: number of device-to-host reads (``.item()``, ``float``, ``bool``, ``int`` of a tensor).
        generator_mismatches: ``"<op>: <generator device> generator -> <tensor device> tensor"`` per bad draw.
        draws: number of audited draws (calls that passed a generator).
    """

    host_syncs: int = 0
    generator_mismatches: list[str] = field(default_factory=list)
    draws: int = 0


def _is_fake_cuda(x: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor) and x.device.type == "cuda"


def _getitem(x: torch.Tensor, idx: Any) -> torch.Tensor:
    """``x[idx]`` through aten ops (basic indexing, and integer tensor indices next to each other)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    pos = [k for k, i in enumerate(idx) if isinstance(i, torch.Tensor)]
    if len(pos) > 1:  # x[rows, cols]: one aten.index over the adjacent integer tensors (their shapes broadcast)
        if pos != list(range(pos[0], pos[0] + len(pos))) or any(idx[k].dtype == torch.bool for k in pos):
            raise NotImplementedError("fake_cuda indexing supports several tensor indices only adjacent and integer")
        if any(idx[k].device != x.device and idx[k].device.type != "cpu" for k in pos):
            raise RuntimeError(f"indices on {[str(idx[k].device) for k in pos]} for a tensor on {x.device}")
        if any(i is Ellipsis or i is None for i in idx[: pos[0]]):
            raise NotImplementedError("fake_cuda indexing: ... or None before several tensor indices")
        head = _getitem(x, idx[: pos[0]]) if pos[0] else x
        dim = sum(not isinstance(i, int) for i in idx[: pos[0]])
        out = _aten.index(head, [None] * dim + [idx[k] for k in pos])
        if any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None))) for i in idx[pos[-1] + 1:]):
            raise NotImplementedError("fake_cuda indexing: only ':' or ... after several tensor indices")
        return out
    out, dim = x, 0
    for i in idx:
        if i is Ellipsis:
            dim += x.dim() - consumed
        elif i is None:
            out = _aten.unsqueeze(out, dim)
            dim += 1
        elif isinstance(i, bool):
            raise NotImplementedError("fake_cuda indexing with a Python bool")
        elif isinstance(i, int):
            out = _aten.select(out, dim, i)
        elif isinstance(i, slice):
            out = _aten.slice(out, dim, i.start if i.start is not None else 0,
                              i.stop if i.stop is not None else 2**62, i.step or 1)
            dim += 1
        elif isinstance(i, torch.Tensor):
            if i.device != x.device and i.device.type != "cpu":
                raise RuntimeError(f"indices on {i.device} for a tensor on {x.device}")
            if i.dtype == torch.bool:  # data-dependent size: the mask selects every row (device checked above)
                dim += i.dim()
            else:
                out = _aten.index(out, [None] * dim + [i])
                dim += i.dim()
        else:
            raise NotImplementedError(f"fake_cuda indexing with {type(i).__name__}")
    return out


_READS = (torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__,
          torch.Tensor.item, torch.Tensor.tolist)


_ATEN_NAME = {"__invert__": "bitwise_not", "__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor"}


def _answer(dtype: torch.dtype) -> bool | int | float:
    """The value a fake device-to-host read returns."""
    if dtype == torch.bool:
        return True
    return 0.5 if dtype.is_floating_point else 1


class _FunctionMode(TorchFunctionMode):
    """Python-level hooks: indexing translation and the generator audit."""

    def __init__(self, record: FakeCuda) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and _is_fake_cuda(args[0]):
            self.record.host_syncs += 1
            t = args[0]
            if func is torch.Tensor.tolist:
                return _aten.zeros(list(t.shape), dtype=t.dtype, device="cpu").tolist()  # shaped like the data
            value = _answer(t.dtype)
            return {torch.Tensor.__bool__: bool, torch.Tensor.__int__: int, torch.Tensor.__index__: int,
                    torch.Tensor.__float__: float}.get(func, lambda v: v)(value)
        if func in (torch.Tensor.nonzero, torch.nonzero) and _is_fake_cuda(args[0]) and args[0].dim() == 1 \
                and not kwargs.get("as_tuple", False):
            self.record.host_syncs += 1  # its size is data-dependent: a host sync on a GPU
            n = args[0].shape[0]  # as for a boolean mask, every element counts as nonzero
            return _aten.unsqueeze(_aten.arange(n, dtype=torch.long, device=args[0].device), 1)
        if func is torch.Tensor.__getitem__ and _is_fake_cuda(args[0]):
            return _getitem(args[0], args[1])
        if func is torch.Tensor.__setitem__ and _is_fake_cuda(args[0]):
            x, idx, val = args
            view = _getitem(x, idx)
            if isinstance(val, torch.Tensor):
                _aten.copy_(view, val)
            else:
                _aten.fill_(view, val)
            return None
        try:
            out = func(*args, **kwargs)
        except RuntimeError as e:
            # A few Tensor methods take a CUDA device guard in their Python binding, before any fake dispatch;
            # the same aten op called directly does not.
            name = _ATEN_NAME.get(getattr(func, "__name__", ""), getattr(func, "__name__", ""))
            if "not linked with support for cuda" not in str(e) or not hasattr(_aten, name):
                raise
            out = getattr(_aten, name)(*args, **kwargs)
        gen = kwargs.get("generator")
        if gen is not None and isinstance(out, torch.Tensor):
            self.record.draws += 1
            if gen.device.type != out.device.type:
                name = getattr(func, "__name__", str(func))
                self.record.generator_mismatches.append(
                    f"{name}: {gen.device} generator -> {out.device} tensor")
        return out


def _sync_mode(record: FakeCuda):
    """A FakeTensorMode that answers device-to-host reads with a fixed value and counts them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    class _Mode(FakeTensorMode):
        def dispatch(self, func, types, args=(), kwargs=None):
            if func is _aten._local_scalar_dense.default:
                record.host_syncs += 1
                return _answer(args[0].dtype)
            return super().dispatch(func, types, args, kwargs)

    return _Mode(allow_non_fake_inputs=True)


def _move_by_overwrite(module: torch.nn.Module, device: torch.device | None,
                       dtype: torch.dtype | None) -> torch.nn.Module:
    """``module.to(device, dtype)`` by replacing each parameter and buffer (floating ones take ``dtype``).

    A module's own ``_apply`` extension (state outside parameters and buffers) is not replayed: move such modules
    first from real tensors (built before the block), which takes torch's own path.
    """
    def moved(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)

    for m in module.modules():
        for k, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[k] = torch.nn.Parameter(moved(p), requires_grad=p.requires_grad)
        for k, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[k] = moved(b)
    return module


@contextlib.contextmanager
def fake_cuda(num_gpus: int = 1, capability: tuple[int, int] = (9, 0)) -> Iterator[FakeCuda]:
    """Run the block as on a host with ``num_gpus`` CUDA devices of compute capability ``capability``, with fake
    tensors (see the module docstring).

    Tensors made inside are fake; real tensors passed in are converted on first use. Leaves every patch undone
    on exit.
    """
    record = FakeCuda()
    saved = (torch.Generator, torch.cuda.is_available, torch.cuda.device_count, torch.cuda.get_device_capability)

    def answer(real, fake):
        # torch's own code (FakeTensorMode decides how to build fake CUDA tensors from this) sees the truth
        def query(*args: Any, **kwargs: Any):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            return real(*args, **kwargs) if caller == "torch" or caller.startswith("torch.") else fake
        return query

    real_to = torch.nn.Module.to

    def module_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        # A move to the device a module already lives on is a no-op in torch; for fake tensors torch would still
        # try to swap each tensor with itself, which fails, so the no-op is taken here.
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if dtype is None and device is not None and all(t.device == device for t in tensors):
            return self
        try:
            return real_to(self, *args, **kwargs)
        except RuntimeError as e:
            # Fake tensors made inside the block cannot be swapped in place (FakeTensorMode holds weak references
            # to them): give the module new Parameter objects instead, as torch does with
            # torch.__future__.set_overwrite_module_params_on_conversion(True).
            if "swap" not in str(e):
                raise
            return _move_by_overwrite(self, device, dtype)

    real_cpu = torch.nn.Module.cpu
    torch.nn.Module.to = module_to  # type: ignore[method-assign]
    torch.nn.Module.cpu = lambda self: module_to(self, "cpu")  # type: ignore[method-assign]
    torch.Generator = _GeneratorFactory  # type: ignore[misc,assignment]
    torch.cuda.is_available = answer(saved[1], True)  # type: ignore[assignment]
    torch.cuda.device_count = answer(saved[2], num_gpus)  # type: ignore[assignment]
    torch.cuda.get_device_capability = answer(saved[3], tuple(capability))  # type: ignore[assignment]
    try:
        with _sync_mode(record), _FunctionMode(record):
            yield record
    finally:
        (torch.Generator, torch.cuda.is_available, torch.cuda.device_count,  # type: ignore[misc]
         torch.cuda.get_device_capability) = saved
        torch.nn.Module.to, torch.nn.Module.cpu = real_to, real_cpu  # type: ignore[method-assign]
