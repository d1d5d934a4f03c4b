"""Fused Flow-SDE step (SPEC S2): ``x_next = A x_t + B v + std z`` with ``z`` drawn in the kernel.

The noise never touches memory: each program draws it with Philox (``tl.randn4x``: one Philox call gives
four normals) from a ``(seed, offset)`` pair, so a step reads ``x_t`` and ``v`` and writes ``x_next`` and
nothing else (3 tensors of memory traffic instead of ~13 for the eager reference). With ``std = 0`` (or
:func:`ode_step`) the noise is compiled out and the kernel is the Euler ODE step (S2c).

Noise layout (independent of the launch configuration, so results are reproducible across devices and block
sizes): for ``numel`` elements and ``Q = ceil(numel / 4)``, element ``e = k * Q + i`` (``k`` in 0..3) receives
the ``k``-th normal of ``Philox(seed, counter = offset + i)``. Successive draws with one seed stay independent
when ``offset`` advances by at least ``Q``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastnft.devices import check_generator
from fastnft.kernels import _common
from fastnft.kernels._common import INT32_LIMIT as _INT32_LIMIT  # a module global: tests lower it
from fastnft.kernels._common import INTERPRETED, store

__all__ = ["INTERPRETED", "bind_sde_step", "fused_sde_step", "ode_step", "philox_seed", "sde_step"]


@triton.jit
def _sde_part(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, std_ptr, e, live, z, numel, row_len,
              s_a, s_b, s_std, a_val, b_val, std_val,
              CDTYPE: tl.constexpr, NOISE: tl.constexpr, HAS_Z: tl.constexpr, SCALAR_COEF: tl.constexpr,
              RTNE_BF16: tl.constexpr):
    ok = live & (e < numel)
    if SCALAR_COEF:
        a = a_val
        b = b_val
        sd = std_val
    else:
        row = e // row_len
        a = tl.load(a_ptr + row * s_a, mask=ok, other=0.0).to(CDTYPE)
        b = tl.load(b_ptr + row * s_b, mask=ok, other=0.0).to(CDTYPE)
        sd = tl.load(std_ptr + row * s_std, mask=ok, other=0.0).to(CDTYPE)
    x = tl.load(x_ptr + e, mask=ok, other=0.0).to(CDTYPE)
    v = tl.load(v_ptr + e, mask=ok, other=0.0).to(CDTYPE)
    out = a * x + b * v  # S2a: the transition mean
    if NOISE:
        if HAS_Z:
            z = tl.load(z_ptr + e, mask=ok, other=0.0).to(CDTYPE)
        out += sd * z.to(CDTYPE)  # S2b
    store(out_ptr + e, out, ok, RTNE_BF16)


@triton.jit
def _sde_step_kernel(
    x_ptr, v_ptr, z_ptr, out_ptr,  # [numel] contiguous, one dtype (z only with HAS_Z)
    a_ptr, b_ptr, std_ptr,  # [N] per-sample coefficients with strides s_a, s_b, s_std (0 = broadcast)
    seed_ptr,  # [1] int64 Philox seed
    numel, row_len, quarter, offset, s_a, s_b, s_std,
    a_val, b_val, std_val,  # scalar coefficients (SCALAR_COEF)
    CDTYPE: tl.constexpr, BLOCK: tl.constexpr,
    NOISE: tl.constexpr, HAS_Z: tl.constexpr, SCALAR_COEF: tl.constexpr, RTNE_BF16: tl.constexpr,
    INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    if INT64:  # numel or a coefficient offset row * stride reaches 2^31
        pid = pid.to(tl.int64)
    i = pid * BLOCK + tl.arange(0, BLOCK)  # Philox counters, each serves 4 elements
    live = i < quarter  # counters past Q would alias the next quarter's elements
    if NOISE and not HAS_Z:
        seed = tl.load(seed_ptr)
        z0, z1, z2, z3 = tl.randn4x(seed, i.to(tl.int64) + offset)
    else:
        z0 = tl.zeros([BLOCK], tl.float32)
        z1 = z0
        z2 = z0
        z3 = z0
    _sde_part(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, std_ptr, i, live, z0, numel, row_len,
              s_a, s_b, s_std, a_val, b_val, std_val, CDTYPE, NOISE, HAS_Z, SCALAR_COEF, RTNE_BF16)
    _sde_part(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, std_ptr, i + quarter, live, z1, numel, row_len,
              s_a, s_b, s_std, a_val, b_val, std_val, CDTYPE, NOISE, HAS_Z, SCALAR_COEF, RTNE_BF16)
    _sde_part(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, std_ptr, i + 2 * quarter, live, z2, numel, row_len,
              s_a, s_b, s_std, a_val, b_val, std_val, CDTYPE, NOISE, HAS_Z, SCALAR_COEF, RTNE_BF16)
    _sde_part(x_ptr, v_ptr, z_ptr, out_ptr, a_ptr, b_ptr, std_ptr, i + 3 * quarter, live, z3, numel, row_len,
              s_a, s_b, s_std, a_val, b_val, std_val, CDTYPE, NOISE, HAS_Z, SCALAR_COEF, RTNE_BF16)


def _coef(c: Tensor, N: int, name: str) -> Tensor:
    """A ``[N]`` view (stride 0 for a 0-d tensor) of a per-sample coefficient."""
    if c.dim() == 0:
        return c.reshape(1).expand(N)
    if c.shape != (N,):
        raise ValueError(f"{name} must be a scalar or a [N] = [{N}] tensor, got shape {tuple(c.shape)}")
    return c


def _launch_config(quarter: int, device: torch.device, block: int | None) -> tuple[int, int]:
    """(BLOCK, num_warps) for ``quarter`` Philox counters: BLOCK = 512 on GPU, 65536 in the interpreter, at most
    ``next_power_of_2(quarter)``; 4 warps up to BLOCK 512 (at most 4 counters, 16 elements, per thread), 8 above.

    At BLOCK 1024 and 4 warps (8 counters per thread) ptxas spills (bench/kernel_compile.json).

    Raises:
        ValueError: ``block`` is not a positive power of two (``tl.arange`` needs one).
    """
    if block is None:
        block = 512 if device.type == "cuda" else 1 << 16
    elif block < 1 or block & (block - 1):
        raise ValueError(f"block must be a positive power of two (Philox counters per program), got {block}; "
                         f"use {triton.next_power_of_2(max(block, 1))} or leave it None")
    block = min(block, triton.next_power_of_2(quarter))
    return block, 4 if block <= 512 else 8


def fused_sde_step(x_t: Tensor, v: Tensor, A: Tensor | float, B: Tensor | float, std: Tensor | float, *,
                   seed: int | Tensor | None = None, offset: int = 0, z: Tensor | None = None,
                   block: int | None = None) -> Tensor:
    """One fused Flow-SDE transition ``x_next = A x_t + B v + std z`` (SPEC S2a-S2b), ``z`` drawn in-kernel.

    Args:
        x_t: ``[N, ...]`` (``[N, H, D]`` in the sampler) float32 | bfloat16 | float16 | float64, CUDA (or CPU
            under ``TRITON_INTERPRET=1``).
        v: velocity, same shape, dtype and device as ``x_t``.
        A, B, std: ``[N]`` tensors (any float dtype, any stride), 0-d tensors, or Python numbers. If all three
            are numbers the coefficients are kernel scalars; ``std == 0`` (a number) compiles the noise out
            (the ODE step, S2c).
        seed: Philox seed, a Python int or a 1-element int64 tensor on ``x_t``'s device (graph-capturable: the
            kernel reads it from memory). Required unless ``z`` is given or ``std == 0``.
        offset: Philox counter offset (see the module docstring for the layout).
        z: optional explicit ``[N, ...]`` standard normal noise (then no Philox draw; matches the reference).
        block: Philox counters per program, a power of two (None = 512 on GPU, 65536 in the interpreter).

    Returns:
        ``[N, ...]`` next state, ``x_t``'s dtype. Computed in float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes/dtypes inconsistent, no seed where noise is needed, or ``block`` not a power of two.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    if x_t.dim() < 1 or v.shape != x_t.shape:
        raise ValueError(f"x_t and v must share a shape [N, ...], got {tuple(x_t.shape)} and "
                         f"{tuple(v.shape)}")
    if x_t.dtype not in _common.SUPPORTED_DTYPES or v.dtype != x_t.dtype or v.device != x_t.device:
        raise ValueError(f"x_t and v must be one float dtype on one device, got {x_t.dtype}/{x_t.device} and "
                         f"{v.dtype}/{v.device}")
    if z is not None and (z.shape != x_t.shape or z.device != x_t.device):
        raise ValueError(f"z must have x_t's shape {tuple(x_t.shape)} and device, got {tuple(z.shape)} "
                         f"{z.device}")
    _common.check_device(x_t)
    N = x_t.shape[0]
    numel = x_t.numel()
    dev = x_t.device
    cdt = _common.compute_dtype(x_t.dtype)
    scalar = not any(isinstance(c, Tensor) for c in (A, B, std))
    noise = isinstance(std, Tensor) or float(std) != 0.0
    if scalar:
        a_val, b_val, std_val = float(A), float(B), float(std)
        a_t = b_t = s_t = x_t  # dummy pointers
        strides = (0, 0, 0)
    else:
        a_val = b_val = std_val = 0.0
        a_t, b_t, s_t = (
            _coef(c if isinstance(c, Tensor) else torch.full((N,), float(c), dtype=cdt, device=dev), N, name)
            for c, name in ((A, "A"), (B, "B"), (std, "std")))
        strides = (a_t.stride(0), b_t.stride(0), s_t.stride(0))
    has_z = z is not None
    if noise and not has_z:
        if seed is None:
            raise ValueError("fused_sde_step needs a seed (int or [1] int64 tensor) when std != 0 and z is "
                             "None")
        seed_t = (seed if isinstance(seed, Tensor)
                  else torch.full((1,), int(seed), dtype=torch.int64, device=dev))
        if seed_t.numel() != 1 or seed_t.device != dev:
            raise ValueError(f"seed tensor must hold 1 element on {dev}, got {tuple(seed_t.shape)} "
                             f"{seed_t.device}")
    else:
        seed_t = x_t  # dummy pointer
    x = x_t.contiguous()
    vv = v.contiguous()
    zz = z.contiguous() if has_z else x
    out = torch.empty_like(x)
    quarter = triton.cdiv(numel, 4)
    block, num_warps = _launch_config(quarter, dev, block)  # validates a user block even when numel == 0
    if numel == 0:
        return out
    # x, v, z and out are contiguous here, so numel bounds their offsets; strided [N] coefficients reach
    # (N - 1) * stride. int64 offsets where either reaches 2^31 (element e of the last quarter is 3Q + i).
    int64 = max(numel + 4, N * max(strides, default=0)) >= _INT32_LIMIT
    _sde_step_kernel[(triton.cdiv(quarter, block),)](
        x, vv, zz, out, a_t, b_t, s_t, seed_t,
        numel, numel // N, quarter, int(offset), *strides,
        a_val, b_val, std_val,
        CDTYPE=_common.TL_DTYPE[cdt], BLOCK=block,
        NOISE=noise, HAS_Z=has_z, SCALAR_COEF=scalar, RTNE_BF16=_common.rtne_bf16(x_t.dtype),
        INT64=int64, num_warps=num_warps,
    )
    return out


def philox_seed(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One ``[1]`` int64 seed drawn on ``device`` from ``generator`` (the default generator when None).

    Raises:
        ValueError: ``generator`` lives on another device (fastnft.devices' draw rule).
    """
    check_generator(generator, device, "fused SDE step Philox seed")
    return torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)


def bind_sde_step(generator: torch.Generator | None, like: Tensor):
    """The fused step of ONE K-step sampling call (what :func:`fastnft.sde.sample_actions` uses).

    One Philox seed is drawn on ``like``'s device when the call starts; step ``j`` of the call then uses counter
    offset ``j * Q`` (``Q = ceil(numel / 4)``), so its noise is independent of every other step's and each SDE
    step is exactly one kernel launch (no per-step seed draw, no host work). Inside a CUDA graph the seed draw
    is captured too and, with ``generator`` registered to the graph, every replay draws a new seed.

    Returns:
        ``step(x_t, v, A, B, std) -> x_next`` with :func:`fused_sde_step`'s shapes and dtypes.
    """
    seed = philox_seed(generator, like.device)
    offset = [0]

    def step(x_t: Tensor, v: Tensor, A: Tensor, B: Tensor, std: Tensor) -> Tensor:
        out = fused_sde_step(x_t, v, A, B, std, seed=seed, offset=offset[0])
        offset[0] += triton.cdiv(x_t.numel(), 4)
        return out

    return step


def sde_step(x_t: Tensor, v: Tensor, A: Tensor, B: Tensor, std: Tensor, z: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Drop-in for :func:`fastnft.sde.sde_step` (and a ``StepFn`` of ``sample_actions``), fused (SPEC S2).

    The Philox seed is one ``torch.randint`` draw from ``generator`` on ``x_t``'s device, so the stream is
    reproducible from the generator's state and the call stays free of host syncs (CUDA-graph capturable).
    The noise differs from the reference's ``torch.randn`` draw (same distribution); pass ``z`` to reproduce
    the reference exactly.

    Args:
        x_t, v: ``[N, H, D]`` float32 | bfloat16 (float16, float64), same dtype and device.
        A, B, std: ``[N]`` tensors, 0-d tensors or numbers (SPEC S2).
        z: optional explicit noise ``[N, H, D]``.
        generator: RNG of the seed draw (its device must be ``x_t``'s).

    Returns:
        ``[N, H, D]``, ``x_t``'s dtype.

    Raises:
        ValueError, RuntimeError: see :func:`fused_sde_step`.
    """
    need_seed = z is None and (isinstance(std, Tensor) or float(std) != 0.0)
    seed = philox_seed(generator, x_t.device) if need_seed else None
    return fused_sde_step(x_t, v, A, B, std, seed=seed, z=z)


sde_step.bind = bind_sde_step  # sample_actions: one seed per sampling call, one launch per step


def ode_step(x_t: Tensor, v: Tensor, delta: float) -> Tensor:
    """Fused Euler step ``x_next = x_t - delta v`` (SPEC S2c), drop-in for :func:`fastnft.sde.ode_step`."""
    return fused_sde_step(x_t, v, 1.0, -float(delta), 0.0)
