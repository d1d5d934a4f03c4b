"""Small torch.distributed helpers that work with and without an initialised process group.

Without a process group every helper acts as the single process of a world of size 1 (``rank() == 0``,
``barrier()`` does nothing, ``all_reduce(x, op)`` returns ``x``, ``all_gather_object(o)`` returns ``[o]``), so
library code calls them unconditionally.

Launch modes handled by :func:`init_distributed`:

* one plain process (``python -m fastnft.train ...``): a gloo (CPU) / nccl (CUDA) group of size 1 is created on
  ``127.0.0.1`` with a free port;
* several processes (``deepspeed --num_gpus N --module fastnft.train ...`` or ``torchrun --nproc_per_node N -m
  fastnft.train ...``): the launcher's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` /
  ``MASTER_PORT`` are used as they are.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_object",
    "all_reduce",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "collective_device",
    "default_backend",
    "ensure_extensions_dir",
    "init_distributed",
    "is_initialized",
    "is_main",
    "local_rank",
    "rank",
    "shutdown_distributed",
    "world_size",
]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def ensure_extensions_dir() -> str:
    """Default ``TORCH_EXTENSIONS_DIR`` to ``~/.cache/fastnft/torch_extensions`` (kept if already set).

    DeepSpeed JIT-compiles a small shared-memory communication op when it initialises on CPU (about 20 s the first
    time); a stable cache folder makes every later start (CI's second test, every rank) reuse the build.

    Returns:
        The folder in use.
    """
    path = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not path:
        path = str(Path.home() / ".cache" / "fastnft" / "torch_extensions")
        os.environ["TORCH_EXTENSIONS_DIR"] = path
    Path(path).mkdir(parents=True, exist_ok=True)
    return path


def default_backend(device: torch.device | str | None = None) -> str:
    """The process-group backend for ``device``: ``nccl`` for CUDA, ``gloo`` for CPU (None = ``nccl`` when CUDA is
    available, else ``gloo``)."""
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def collective_device() -> torch.device:
    """Device of the tensors the default group's collectives take: ``cuda:LOCAL_RANK`` for NCCL (which rejects CPU
    tensors), CPU for gloo or without a group."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


# Set next to the launcher variables when this module made a single-process world itself, so that a child process
# that inherits the environment can tell them from a real launch.
_OWNER_VAR = "FASTNFT_SINGLE_PROCESS_PID"


def _owner_tag(port: str | None) -> str:
    """The value of ``FASTNFT_SINGLE_PROCESS_PID`` for a single-process world this process made on ``port``."""
    return f"{os.getpid()}:{port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_initialized() -> bool:
    """True when a default torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, device: torch.device | str | None = None) -> tuple[int, int]:
    """Initialise the default process group once (idempotent) through ``deepspeed.init_distributed``.

    Each rank binds ``cuda:LOCAL_RANK`` as its current CUDA device before the group exists (NCCL needs it). With
    ``device`` = CPU on a CUDA host, DeepSpeed is told to use its CPU accelerator (``DS_ACCELERATOR=cpu``) and the
    group is gloo, so ``device: cpu`` is honoured.

    Args:
        backend: ``gloo``, ``nccl`` or None (= :func:`default_backend` of ``device``).
        device: this process's device (None = CUDA when available).

    Returns:
        ``(rank, world_size)``.

    Raises:
        RuntimeError: only some of the launcher variables are set (a broken launch); the message names them.
            (An accelerator that DeepSpeed already chose differently is reported by ``ActorEngine``.)
    """
    if device is not None and torch.device(device).type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at DeepSpeed's first get_accelerator()
    if is_initialized():
        return rank(), world_size()
    ensure_extensions_dir()
    owner = os.environ.pop(_OWNER_VAR, None)
    if owner is not None and owner != _owner_tag(os.environ.get("MASTER_PORT")) \
            and owner.endswith(f":{os.environ.get('MASTER_PORT')}") and os.environ.get("WORLD_SIZE") == "1":
        # Inherited unchanged from a parent that made its own single-process world (a script or test that trains,
        # then starts `fastnft ...`): not a launch of this process, and MASTER_PORT is the parent's, in use.
        # A launcher (torchrun, deepspeed) sets its own MASTER_PORT, which keeps its variables.
        for k in _LAUNCH_VARS:
            os.environ.pop(k, None)
    present = [k for k in ("RANK", "WORLD_SIZE") if k in os.environ]
    if len(present) == 1:
        raise RuntimeError(f"only {present[0]} is set in the environment; a distributed launch needs both RANK and "
                           "WORLD_SIZE. Launch with `deepspeed --num_gpus N --module fastnft.train ...` or "
                           "`torchrun --nproc_per_node N ...`, or unset it for a single process.")
    if not present:  # one plain process: a world of size 1 on localhost
        port = str(_free_port())
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                          **{_OWNER_VAR: _owner_tag(port)})
    else:
        os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_PORT is not; use a launcher "
                               "(deepspeed / torchrun) that sets it, or set MASTER_PORT yourself.")
    backend = backend or default_backend(device)
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed  # heavy import; only when a group is really created

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return rank(), world_size()


def shutdown_distributed() -> None:
    """Wait for all ranks, then destroy the default process group (no-op without one); call once, at exit.

    A gloo rank that reaches interpreter exit while its group's worker threads are still alive can abort in
    C++ ("terminate called without an active exception", exit code -6) after all its work is done; tearing the
    group down first makes every rank exit cleanly. A later :func:`init_distributed` creates a new group.
    """
    if not is_initialized():
        return
    barrier()
    dist.destroy_process_group()
    if os.environ.get(_OWNER_VAR) == _owner_tag(os.environ.get("MASTER_PORT")):
        # this process made the single-process world: drop its variables so that a later group picks a fresh
        # port instead of the released one (a launcher's variables stay)
        for k in (*_LAUNCH_VARS, _OWNER_VAR):
            os.environ.pop(k, None)


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """Rank on this node: ``LOCAL_RANK`` from the launcher, 0 without one."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes checkpoints, logs and reports."""
    return rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op without a process group or with one rank)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """All-reduce of ``t`` over ranks (identity with one rank); returns the result on ``t``'s device and dtype.

    The collective runs on a copy on :func:`collective_device` (CUDA for an NCCL group, CPU for gloo), so callers
    may pass tensors of any device.

    Args:
        t: the tensor (not modified).
        op: a ``torch.distributed.ReduceOp`` (e.g. ``ReduceOp.SUM``, ``ReduceOp.MIN``).
    """
    if is_initialized() and world_size() > 1:
        work = t.to(collective_device())
        dist.all_reduce(work, op=op)
        return work.to(t.device)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), indexed by rank; ``[obj]`` without a process group or with one rank."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, in place and returned (any shape; float dtype; any device: the collective
    runs on :func:`collective_device` like :func:`all_reduce`, so a CPU tensor under NCCL works).

    Raises:
        TypeError: an integer/bool tensor (the mean would truncate); convert it with ``.float()`` first.
    """
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}; call .float() first")
    if is_initialized() and world_size() > 1:
        work = tensor.to(collective_device())  # the tensor itself when it is already there
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        tensor.copy_(work.div_(world_size()))
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects; identity without a process group)."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
