"""Fused Triton kernels and their run-time dispatch (``engine.kernels: auto | triton | torch``).

- :func:`get_stepnft_loss` / :func:`get_sde_step` return a callable with exactly the reference's signature
  (:func:`fastnft.nft.stepnft_loss`, :func:`fastnft.sde.sde_step`), fused or reference.
- One op per module: :mod:`fastnft.kernels.stepnft_loss` (``stepnft_loss``, ``StepNFTLossFunction``) and
  :mod:`fastnft.kernels.sde_step` (``sde_step``, ``fused_sde_step``, ``ode_step``); shared helpers in
  :mod:`fastnft.kernels._common`.

Only the kernel modules import triton, and this package imports them only inside the getters, when a fused kernel
is asked for. So ``import fastnft.kernels`` (and the ``torch``/``auto``-on-CPU paths) never touches triton, CPU-only
code pays nothing, and ``TRITON_INTERPRET=1`` takes effect if it is set before the first fused kernel is requested
(or a kernel module is imported): the ``@triton.jit`` kernels read it when they are defined.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch

__all__ = ["KernelMode", "get_sde_step", "get_stepnft_loss", "triton_usable"]

KernelMode = Literal["auto", "triton", "torch"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_usable(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device``: CUDA with compute capability >= 8.0 (bf16, the
    kernels' tuning target) and an importable triton, or any device under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if _interpreting():
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 0)


def _resolve(mode: str, device: torch.device | str) -> bool:
    """True = use the fused kernel. Raises for an unknown mode or ``triton`` where it cannot run."""
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {mode!r}")
    if mode == "torch":
        return False
    device = torch.device(device)
    if mode == "auto":
        # CUDA only: the fused kernels replace 7-40 eager launches by 1-3, so they are never slower there; on
        # CPU the interpreter is a test vehicle, not a fast path.
        return device.type == "cuda" and triton_usable(device)
    if not triton_usable(device):
        raise RuntimeError(
            f"kernels: triton needs a CUDA device (compute capability >= 8.0) with triton installed, got "
            f"{device}; set engine.kernels: torch (or auto, which falls back to the PyTorch reference), "
            "or set TRITON_INTERPRET=1 before importing fastnft.kernels to run the kernels on CPU "
            "(tests only)")
    return True


def get_stepnft_loss(mode: KernelMode, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The StepNFT loss implementation for ``engine.kernels = mode`` on ``device`` (SPEC S5-S8).

    Returns a callable with :func:`fastnft.nft.stepnft_loss`'s exact signature. ``auto``: the fused kernel on
    CUDA (falling back to the reference for a call where an input other than ``v_theta`` requires grad),
    the reference elsewhere. ``triton``: the fused kernel. ``torch``: the reference.

    Raises:
        ValueError: unknown mode.
        RuntimeError: ``triton`` on a device where the kernels cannot run (the message names the fix).
    """
    from fastnft.nft import stepnft_loss as reference

    if not _resolve(mode, device):
        return reference
    from fastnft.kernels.stepnft_loss import stepnft_loss as fused

    if mode == "triton":
        return fused

    def stepnft_loss_auto(v_theta, v_old, x_t, x_next, A, B, std, y, mask=None, **kwargs):
        others = (v_old, x_t, x_next, A, B, std, y, kwargs.get("t"), kwargs.get("x0"))
        if torch.is_grad_enabled() and any(o is not None and o.requires_grad for o in others):
            return reference(v_theta, v_old, x_t, x_next, A, B, std, y, mask, **kwargs)
        return fused(v_theta, v_old, x_t, x_next, A, B, std, y, mask, **kwargs)

    stepnft_loss_auto.__doc__ = fused.__doc__
    return stepnft_loss_auto


def get_sde_step(mode: KernelMode, device: torch.device | str) -> Callable[..., torch.Tensor]:
    """The Flow-SDE step for ``engine.kernels = mode`` on ``device`` (SPEC S2), usable as ``sample_actions``'s
    ``step_fn``: ``(x_t, v, A, B, std, z=None, generator=None) -> x_next``.

    ``auto``: fused on CUDA, reference elsewhere; ``triton``: fused; ``torch``: :func:`fastnft.sde.sde_step`.
    The fused step draws its noise with Philox from a seed taken from ``generator`` (same distribution,
    different numbers than the reference's ``torch.randn``).

    Raises:
        ValueError: unknown mode.
        RuntimeError: ``triton`` on a device where the kernels cannot run (the message names the fix).
    """
    from fastnft.sde import sde_step as reference

    if not _resolve(mode, device):
        return reference
    from fastnft.kernels.sde_step import sde_step as fused

    return fused
