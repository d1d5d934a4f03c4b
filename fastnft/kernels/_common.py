"""Helpers shared by the kernel modules: the rounding store, interpreter detection, dtypes, checks, limits.

Imports triton, so only the kernel modules import it (never :mod:`fastnft.kernels` itself). ``TRITON_INTERPRET=1``
must be set before this module is first imported for the kernels to run on CPU (:data:`INTERPRETED`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INT32_LIMIT", "INTERPRETED", "SUPPORTED_DTYPES", "TL_DTYPE", "check_device", "compute_dtype",
           "rtne_bf16", "store"]


@triton.jit
def store(ptr, value, mask, RTNE_BF16: tl.constexpr):
    # Narrowing casts round to nearest even on the GPU, but the interpreter truncates: with RTNE_BF16
    # (interpreter + bf16 output) round the float32 bits explicitly first, so CPU tests see the GPU's
    # rounding.
    if RTNE_BF16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        value = tl.where(value != value, value, bits.to(tl.float32, bitcast=True))  # noqa: PLR0124 (keep NaN)
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


INTERPRETED: bool = type(store).__name__ == "InterpretedFunction"
"""True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors)."""

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Input dtypes the kernels take."""

TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
"""Triton dtype of each compute dtype."""

INT32_LIMIT = 2**31
"""Element offsets at or above it need 64-bit index arithmetic in the kernel."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rtne_bf16(dtype: torch.dtype) -> bool:
    """The ``RTNE_BF16`` flag of :func:`store` for an output of ``dtype`` (interpreter and bf16)."""
    return INTERPRETED and dtype == torch.bfloat16


def check_device(x: Tensor) -> None:
    """Refuse CPU tensors unless the kernels run in the interpreter.

    Raises:
        RuntimeError: ``x`` is not on CUDA and ``TRITON_INTERPRET=1`` was not set; the message names the fix.
    """
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the fused Triton kernels need CUDA tensors (got {x.device.type}); use engine.kernels: torch or "
            "auto (the PyTorch reference), or set TRITON_INTERPRET=1 before importing fastnft.kernels to run "
            "them on CPU")
