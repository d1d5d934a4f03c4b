"""Device truth: one resolved device per process, and the one rule for random draws (DESIGN: "One resolved
device flows everywhere").

The rule for random draws: **a generator lives on the device it draws for**. Every draw passes
``device=`` equal to its generator's device, so on CUDA the trainer's noise, solver indices and shuffles are all
device draws (no host round trip, CUDA-graph capturable) and on CPU nothing changes. :func:`check_generator`
enforces the rule at every draw site in fastnft; it exists because a CPU generator handed to a CUDA draw fails
only on a real GPU (and FakeTensorMode, which the device tests use, does not check generators at all).

    device = resolve_device("auto")                  # cuda:LOCAL_RANK on a GPU host, else cpu
    gen = make_generator(device, seed=1234)
    check_generator(gen, device, "rollout noise")    # raises on a mismatch, naming the fix
"""

from __future__ import annotations

import os

import torch

__all__ = ["PinnedStager", "check_generator", "check_precision", "egl_device_id", "local_rank", "make_generator",
           "resolve_device"]


def local_rank() -> int:
    """This process's rank on its node: ``LOCAL_RANK`` from the launcher, 0 without one."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(name: str | torch.device) -> torch.device:
    """The device of this process for config value ``device`` (``auto | cpu | cuda``).

    ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. A CUDA device always carries an explicit index,
    ``cuda:LOCAL_RANK`` (each rank owns the GPU of its local rank), so tensors, modules and generators built from
    it never depend on whichever device happens to be current. ``cpu`` is honoured on a CUDA host.

    Raises:
        RuntimeError: ``cuda`` requested but no CUDA device is visible, or ``LOCAL_RANK`` names a GPU that does not
            exist (more ranks on this node than GPUs).
        ValueError: any other name.
    """
    dev = torch.device(name) if isinstance(name, str) and name != "auto" else name
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(dev, torch.device) or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no CUDA device is visible; set device: auto or cpu")
    index = dev.index if dev.index is not None else local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise RuntimeError(f"LOCAL_RANK={index} but this node has {count} CUDA device(s); launch at most {count} "
                           "ranks per node (deepspeed --num_gpus / torchrun --nproc_per_node)")
    return torch.device("cuda", index)


def make_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed`` (the generator draws for tensors on ``device``).

    A CUDA generator's state (``get_state``) is a CPU byte tensor like a CPU one's, so checkpoints store both alike;
    the two are not interchangeable (a CPU state does not load into a CUDA generator).
    """
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def check_generator(generator: torch.Generator | None, device: torch.device | str | torch.Tensor, what: str) -> None:
    """Enforce the draw rule: ``generator`` (None = the default generator of ``device``) lives on ``device``.

    Args:
        generator: the generator a draw is about to use.
        device: the device of the tensor being drawn (or a tensor on it).
        what: name of the draw, for the message (``"policy noise"``).

    Raises:
        ValueError: the generator's device type differs from the draw's; the message names the draw and the fix.
    """
    if generator is None:
        return
    dev = device.device if isinstance(device, torch.Tensor) else torch.device(device)
    if generator.device.type != dev.type:
        raise ValueError(f"{what}: a {generator.device.type} generator draws for {dev} tensors; generators live on "
                         f"the device they draw for: build it with fastnft.devices.make_generator({str(dev)!r}, "
                         "seed)")


def check_precision(device: torch.device | str, dtype: str) -> None:
    """``engine.dtype`` is usable on ``device``: bf16 autocast on CUDA needs compute capability >= 8.0 (Ampere).

    On an older GPU (V100 sm_70, T4 sm_75) torch's bf16 autocast raises inside the first policy call, or emulates
    bf16 matmuls slowly; this names the config key instead.

    Raises:
        ValueError: ``dtype == "bfloat16"`` on a CUDA device of compute capability < 8.0.
    """
    dev = torch.device(device)
    if dtype != "bfloat16" or dev.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        raise ValueError(f"engine.dtype: bfloat16 needs a GPU of compute capability >= 8.0 (Ampere or newer); {dev} "
                         f"is sm_{major}{minor}. Fix: set engine.dtype: float32")


def egl_device_id(device: torch.device | str, visible: str | None = None) -> str | None:
    """``MUJOCO_EGL_DEVICE_ID`` for simulators that render on ``device``'s GPU (the rank's own: co-location).

    CUDA numbers the visible devices from 0; EGL numbers every GPU of the machine. So the physical index is entry
    ``device.index`` of ``CUDA_VISIBLE_DEVICES`` when that is a list of integers, else ``device.index``. EGL's
    order can still differ from CUDA's unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (unverified on a GPU: docs/gpu.md).

    Args:
        device: the rank's device. visible: ``CUDA_VISIBLE_DEVICES`` (default: read from the environment).

    Returns:
        The id as a string, or None for a non-CUDA device or a ``CUDA_VISIBLE_DEVICES`` of UUIDs (leave MuJoCo's
        default).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = dev.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return str(index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if index >= len(ids) or not ids[index].isdigit():
        return None
    return ids[index]


class PinnedStager:
    """Host frames -> ``device`` through reused page-locked buffers and non-blocking copies.

    ``stage(name, x)`` copies the host tensor ``x`` into a pinned buffer kept per ``(name, shape, dtype)`` and
    starts an asynchronous copy to ``device`` (the host does not wait for it; work queued after it on the current
    stream sees the data). A buffer is reused only after the previous copy out of it finished (an event per
    buffer), so a frame is never overwritten while in flight. On a non-CUDA device it returns ``x.to(device)``.

    Args:
        device: the policy's device.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._bufs: dict[tuple, tuple[torch.Tensor, object]] = {}

    def stage(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` (host tensor, any shape / dtype) on ``self.device``; same values."""
        if self.device.type != "cuda" or x.device.type != "cpu":
            return x.to(self.device)
        key = (name, tuple(x.shape), x.dtype)
        buf, done = self._bufs.get(key, (None, None))
        if buf is None:
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        elif done is not None:
            done.synchronize()  # the previous copy out of this buffer has finished (usually long ago)
        buf.copy_(x)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._bufs[key] = (buf, event)
        return out
