"""Fused π-StepNFT loss (SPEC S5-S8): one forward launch computes the loss AND its gradient w.r.t. v_theta.

Per token (one row of ``D`` action dims) the forward kernel loads ``v_theta, v_old, x_t, x_next`` once and
computes, in float32 (float64 for float64 inputs):

    r   = x_next - mu_old,  mu_old = A x_t + B v_old           rollout residual
    dv  = v_theta - v_old,  g = <r, dv>,  q = ||dv||^2          two dot products over D
    s   = min(1, max_drift / (sqrt(q) + 1e-8))                  S5 clip factor (1 when the clip is off)
    u   = s g = <r, dv_c>,  w = s^2 q = ||dv_c||^2,  b = beta B
    E+ - E0 = (-2 b u + b^2 w) / var,  E- - E0 = (2 b u + b^2 w) / var,  E0 = ||r||^2 / var  (S6, S7)

so every variant's token loss is a function ``f(u, w)`` (plus ``E0`` for wMSE, which does not depend on
``v_theta``). By the chain rule, with ``s' = ds/d||dv|| = -s / (||dv|| + 1e-8)`` where the clip is active
(the factor is NOT detached, S5) and 0 elsewhere:

    dL_tok/d v_theta = f_u s r + [ 2 f_w s^2 + (f_u g + 2 f_w s q) s' / ||dv|| ] dv + (2 kl_coef / D) dv

The forward stores this per-token gradient, weighted by ``mask_n`` (the normaliser is applied later), together
with one partial sum per program; a tiny second kernel reduces the partial sums to the masked mean and its
normaliser ``1 / max(valid tokens, C)`` (S7: mean over the C tokens, then over valid samples, so
``C * max(valid samples, 1)``). The backward only scales the saved gradient by ``grad_out / normaliser``.

With ``target="x0"`` (S8) the same algebra runs with ``A -> 1``, ``B -> -t``, ``x_next -> x0``
(see :func:`fastnft.nft.stepnft_terms`), selected by a ``tl.constexpr`` flag like every other variant.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastnft.kernels import _common
from fastnft.kernels._common import INT32_LIMIT as _INT32_LIMIT  # a module global: tests lower it
from fastnft.kernels._common import INTERPRETED, store
from fastnft.nft import DRIFT_EPS, VAR_EPS, BranchKind, LossKind, TargetKind, _check

__all__ = ["INTERPRETED", "StepNFTLossFunction", "stepnft_loss", "stepnft_loss_forward"]

_VAR_EPS = tl.constexpr(VAR_EPS)
_DRIFT_EPS = tl.constexpr(DRIFT_EPS)


@triton.jit
def _softplus(x):
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)), with log1p accurate for tiny arguments.
    e = tl.exp(-tl.abs(x))
    log1p_e = tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e))
    return tl.maximum(x, 0.0) + log1p_e


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _stepnft_fwd_kernel(
    vt_ptr, vo_ptr, xt_ptr, xn_ptr,  # [N, C, D], last dim contiguous, strides (s_n, s_c, 1)
    a_ptr, b_ptr, std_ptr, y_ptr, m_ptr,  # [N] contiguous (b_ptr holds t for target x0; m_ptr uint8)
    grad_ptr,  # [N * C, D] contiguous, dtype of v_theta: mask_n * dL_tok / d v_theta
    part_ptr,  # [2, num_programs] compute dtype: sum(mask * (L_tok + kl_coef kl_tok)), sum(mask)
    T, C, D,
    s_vt_n, s_vt_c, s_vo_n, s_vo_c, s_xt_n, s_xt_c, s_xn_n, s_xn_c,
    beta, gamma, max_drift, kl_coef,
    CDTYPE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    CLIP: tl.constexpr, WMSE: tl.constexpr, POS: tl.constexpr, NEG: tl.constexpr, X0: tl.constexpr,
    HAS_MASK: tl.constexpr, STORE_GRAD: tl.constexpr, RTNE_BF16: tl.constexpr, INT64: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    if INT64:  # some element offset n * stride_n + c * stride_c + d of the (strided) inputs exceeds int32
        rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols < D)[None, :]
    n = rows // C
    c = rows - n * C

    # per-sample coefficients of the supervised step (S2), labels (S4) and mask
    if X0:
        a = tl.full([BLOCK_T], 1.0, CDTYPE)
        b = -tl.load(b_ptr + n, mask=row_ok, other=0.0).to(CDTYPE)
    else:
        a = tl.load(a_ptr + n, mask=row_ok, other=0.0).to(CDTYPE)
        b = tl.load(b_ptr + n, mask=row_ok, other=0.0).to(CDTYPE)
    sd = tl.load(std_ptr + n, mask=row_ok, other=0.0).to(CDTYPE)
    y = tl.load(y_ptr + n, mask=row_ok, other=0.0).to(CDTYPE)
    if HAS_MASK:
        m = tl.load(m_ptr + n, mask=row_ok, other=0).to(CDTYPE)
    else:
        m = row_ok.to(CDTYPE)
    inv_var = 1.0 / (sd * sd + _VAR_EPS)  # S6, a constant w.r.t. theta

    col = cols[None, :]
    vt = tl.load(vt_ptr + (n * s_vt_n + c * s_vt_c)[:, None] + col, mask=ok, other=0.0).to(CDTYPE)
    vo = tl.load(vo_ptr + (n * s_vo_n + c * s_vo_c)[:, None] + col, mask=ok, other=0.0).to(CDTYPE)
    xt = tl.load(xt_ptr + (n * s_xt_n + c * s_xt_c)[:, None] + col, mask=ok, other=0.0).to(CDTYPE)
    xn = tl.load(xn_ptr + (n * s_xn_n + c * s_xn_c)[:, None] + col, mask=ok, other=0.0).to(CDTYPE)

    dv = vt - vo  # S5
    r = xn - (a[:, None] * xt + b[:, None] * vo)  # x_next - mu_old
    g = tl.sum(r * dv, axis=1)
    q = tl.sum(dv * dv, axis=1)

    if CLIP:
        norm = tl.sqrt(q)
        ratio = max_drift / (norm + _DRIFT_EPS)
        active = ratio <= 1.0  # torch.clamp(max=1) passes the gradient at equality too
        s = tl.where(active, ratio, 1.0)
        # s' / ||dv|| with s' = -ratio / (||dv|| + eps); zero where the clip is off or dv = 0 (then g = q = 0)
        safe_norm = tl.where(norm > 0.0, norm, 1.0)
        ds_over_norm = tl.where(active & (norm > 0.0), -ratio / ((norm + _DRIFT_EPS) * safe_norm), 0.0)
    else:
        s = tl.full([BLOCK_T], 1.0, CDTYPE)
        ds_over_norm = tl.zeros([BLOCK_T], CDTYPE)

    bb = beta * b
    u = s * g  # <r, dv_c>
    w = s * s * q  # ||dv_c||^2
    e_pos_rel = (-2.0 * bb * u + bb * bb * w) * inv_var  # E+ - E0
    e_neg_rel = (2.0 * bb * u + bb * bb * w) * inv_var  # E- - E0

    if WMSE:  # S8: L = r E+ + (1 - r) E-, r = (y + 1) / 2 (per branch selection)
        rr = 0.5 * (y + 1.0)
        e0 = tl.sum(r * r, axis=1) * inv_var
        lp = rr if POS else tl.zeros([BLOCK_T], CDTYPE)  # dL/dE+
        ln = (1.0 - rr) if NEG else tl.zeros([BLOCK_T], CDTYPE)  # dL/dE-
        loss_tok = lp * (e0 + e_pos_rel) + ln * (e0 + e_neg_rel)
    else:  # S7 ranking, or a single branch ranked against E0 (S8)
        if POS and NEG:
            diff = -4.0 * bb * u * inv_var  # E+ - E-, exact (the quadratic terms cancel, S7)
        elif POS:
            diff = e_pos_rel  # E+ - E0
        else:
            diff = -e_neg_rel  # E0 - E-
        arg = 0.5 * gamma * y * diff
        loss_tok = _softplus(arg)
        dsig = _sigmoid(arg) * 0.5 * gamma * y
        lp = dsig if POS else tl.zeros([BLOCK_T], CDTYPE)
        ln = -dsig if NEG else tl.zeros([BLOCK_T], CDTYPE)

    kl_tok = q / D
    tok = m * (loss_tok + kl_coef * kl_tok)
    tok = tl.where(row_ok, tok, 0.0)
    tl.store(part_ptr + pid, tl.sum(tok, axis=0))
    tl.store(part_ptr + tl.num_programs(0) + pid, tl.sum(m, axis=0))

    if STORE_GRAD:
        f_u = (lp - ln) * (-2.0 * bb * inv_var)
        f_w = (lp + ln) * (bb * bb * inv_var)
        coef_r = m * f_u * s
        coef_dv = m * (2.0 * f_w * s * s + (f_u * g + 2.0 * f_w * s * q) * ds_over_norm + 2.0 * kl_coef / D)
        grad = coef_r[:, None] * r + coef_dv[:, None] * dv
        store(grad_ptr + rows[:, None] * D + col, grad, ok, RTNE_BF16)


@triton.jit
def _finish_kernel(part_ptr, loss_ptr, inv_ptr, P, C, BLOCK: tl.constexpr):
    # One program: loss = sum(part[0]) / max(sum(part[1]), C); inv = 1 / max(sum(part[1]), C).
    offs = tl.arange(0, BLOCK)
    acc_l = tl.zeros([BLOCK], part_ptr.dtype.element_ty)
    acc_m = tl.zeros([BLOCK], part_ptr.dtype.element_ty)
    for start in range(0, P, BLOCK):
        idx = start + offs
        acc_l += tl.load(part_ptr + idx, mask=idx < P, other=0.0)
        acc_m += tl.load(part_ptr + P + idx, mask=idx < P, other=0.0)
    denom = tl.maximum(tl.sum(acc_m, axis=0), C * 1.0)  # C * max(valid samples, 1)
    tl.store(loss_ptr, (tl.sum(acc_l, axis=0) / denom).to(loss_ptr.dtype.element_ty))
    tl.store(inv_ptr, (1.0 / denom).to(inv_ptr.dtype.element_ty))


@triton.jit
def _scale_kernel(g_ptr, out_ptr, go_ptr, inv_ptr, numel, CDTYPE: tl.constexpr, BLOCK: tl.constexpr,
                  RTNE_BF16: tl.constexpr, INT64: tl.constexpr):
    # out = g * (grad_out * inv): the whole backward of the fused loss.
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    scale = tl.load(go_ptr).to(CDTYPE) * tl.load(inv_ptr).to(CDTYPE)
    g = tl.load(g_ptr + offs, mask=ok, other=0.0).to(CDTYPE)
    store(out_ptr + offs, g * scale, ok, RTNE_BF16)


def offset_bound(*tensors: Tensor) -> int:
    """One past the largest element offset any of ``tensors`` reaches: ``sum((size - 1) * stride) + 1``.

    For a strided ``[:, :C]`` view of ``[N, H, D]`` this is about ``N * H * D`` (``N * stride_n``), not ``N * C * D``:
    the bound that int32 offsets must respect.
    """
    return max((sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1 if t.numel() else 0) for t in tensors)


def _launch_config(T: int, D: int, device: torch.device, block_tokens: int | None) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): ~1k elements per program over 8 warps on GPU (4 per thread); few, large
    programs in the interpreter.

    Each thread keeps ~30 per-token values for each of its rows, so registers grow with elements per thread: at
    2048 elements over 4 warps (16 per thread; D = 4) ptxas needs 255 registers and spills on sm_80 and sm_90,
    at 4 per thread about 80 (bench/kernel_compile.json, "tuning").
    A user ``block_tokens`` is rounded up to a power of two.
    """
    block_d = triton.next_power_of_2(D)
    if block_tokens is None:
        per_program = 1 << 16 if device.type != "cuda" else 1024
        block_tokens = max(1, per_program // block_d)
    block_t = triton.next_power_of_2(max(1, min(block_tokens, T)))
    num_warps = 8 if block_t * block_d >= 1024 else 4
    return block_t, block_d, num_warps


def _row_view(x: Tensor) -> Tensor:
    """``[N, C, D]`` with a unit last stride (copies only when the last dim is strided)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def stepnft_loss_forward(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor,
                         std: Tensor, y: Tensor, mask: Tensor | None = None, *, beta: float = 1.0,
                         gamma: float = 1.0, max_drift: float | None = 0.5, kl_coef: float = 1e-4,
                         loss: LossKind = "ranking", target: TargetKind = "next",
                         branches: BranchKind = "both", t: Tensor | None = None, x0: Tensor | None = None,
                         store_grad: bool = True,
                         block_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launch the fused forward: the loss, its normaliser and the (un-normalised) gradient w.r.t. ``v_theta``.

    Args:
        v_theta, v_old, x_t, x_next: ``[N, C, D]`` float32 | bfloat16 | float16 | float64, one dtype, one
            device, unit stride over ``D`` (other strides are free: a ``[:, :C]`` slice of ``[N, H, D]`` is
            fine).
        A, B, std, y: ``[N]`` any float dtype (cast to the compute dtype in the kernel).
        mask: ``[N]`` bool or None.
        t, x0: ``[N]`` and ``[N, C, D]``, only for ``target="x0"``; they replace ``B -> -t`` and ``x_next``.
        beta, gamma, max_drift, kl_coef, loss, target, branches: as :func:`fastnft.nft.stepnft_loss`.
        store_grad: write the gradient (False = forward only, 4 reads of ``[N, C, D]`` and nothing else).
        block_tokens: tokens per program, rounded up to a power of two (None = ~1024 elements on GPU, 65536
            in the interpreter).

    Returns:
        ``(loss, inv, grad)``: 0-d loss (float32; float64 for float64 inputs), 0-d ``inv = 1 / (C * max(valid
        samples, 1))``, and ``grad`` ``[N, C, D]`` in ``v_theta``'s dtype with ``dL/dv_theta = grad * inv``
        (None when ``store_grad`` is False).

    Raises:
        ValueError: shapes, dtypes or variant names inconsistent (same checks as the reference), or ``C`` or
            ``D`` is 0 (``N = 0`` is fine: loss 0, empty gradient, no launch).
        RuntimeError: tensors not on CUDA and the kernels not defined under ``TRITON_INTERPRET=1``.
    """
    _check(v_theta, v_old, x_t, x_next, A, B, std, y, mask)
    if loss not in ("ranking", "wmse"):
        raise ValueError(f"loss must be 'ranking' or 'wmse', got {loss!r}")
    if branches not in ("both", "positive", "negative"):
        raise ValueError(f"branches must be 'both', 'positive' or 'negative', got {branches!r}")
    if target == "x0":
        if t is None or x0 is None:
            raise ValueError("target='x0' needs t ([N] solver time t_i) and x0 ([N, C, D] final rollout "
                             "sample)")
        if x0.shape != v_theta.shape or t.shape != A.shape:
            raise ValueError(f"x0 must be {tuple(v_theta.shape)} and t [N], got {tuple(x0.shape)}, "
                             f"{tuple(t.shape)}")
    elif target != "next":
        raise ValueError(f"target must be 'next' or 'x0', got {target!r}")
    if v_theta.dtype not in _common.SUPPORTED_DTYPES:
        raise ValueError(f"v_theta must be float32, bfloat16, float16 or float64, got {v_theta.dtype}")
    xn = x0 if target == "x0" else x_next
    big = (v_theta, v_old, x_t, xn)
    for name, tns in zip(("v_old", "x_t", "x_next" if target == "next" else "x0"), big[1:]):
        if tns.dtype != v_theta.dtype or tns.device != v_theta.device:
            raise ValueError(f"{name} must match v_theta's dtype/device {v_theta.dtype}/{v_theta.device}, "
                             f"got {tns.dtype}/{tns.device}")
    _common.check_device(v_theta)
    N, C, D = v_theta.shape
    T = N * C
    dev = v_theta.device
    cdt = _common.compute_dtype(v_theta.dtype)
    if C == 0 or D == 0:
        raise ValueError(f"v_theta must have at least one supervised step and one action dim, got [N, C, D] = "
                         f"{[N, C, D]}; check policy.n_action_steps and the action space")
    if N == 0:  # an empty micro-batch: the reference's 0 (mean over no valid sample), no kernel (BLOCK would be 0)
        grad = torch.empty((0, C, D), dtype=v_theta.dtype, device=dev) if store_grad else None
        return torch.zeros((), dtype=cdt, device=dev), torch.full((), 1.0 / C, dtype=cdt, device=dev), grad
    vt, vo, xt, xn = (_row_view(u) for u in big)
    # int32 offsets hold only while every strided input's largest offset (N * stride_n, not N * C * D) and the
    # gradient's T * D stay below 2^31; beyond that the kernel switches to int64 offsets.
    int64 = max(offset_bound(vt, vo, xt, xn), T * D) >= _INT32_LIMIT
    a_, b_ = (A, t) if target == "x0" else (A, B)
    a_, b_, sd, y_ = (u.contiguous() for u in (a_, b_, std, y))
    m = mask.contiguous().view(torch.uint8) if mask is not None else sd  # dummy pointer when HAS_MASK=False
    grad = torch.empty((N, C, D), dtype=v_theta.dtype, device=dev) if store_grad else None
    block_t, block_d, num_warps = _launch_config(T, D, dev, block_tokens)
    P = triton.cdiv(T, block_t)
    part = torch.empty((2, P), dtype=cdt, device=dev)
    _stepnft_fwd_kernel[(P,)](
        vt, vo, xt, xn, a_, b_, sd, y_, m, grad if store_grad else part, part,
        T, C, D,
        vt.stride(0), vt.stride(1), vo.stride(0), vo.stride(1), xt.stride(0), xt.stride(1), xn.stride(0),
        xn.stride(1),
        float(beta), float(gamma), float(max_drift) if max_drift is not None else 0.0, float(kl_coef),
        CDTYPE=_common.TL_DTYPE[cdt], BLOCK_T=block_t, BLOCK_D=block_d,
        CLIP=max_drift is not None, WMSE=loss == "wmse", POS=branches in ("both", "positive"),
        NEG=branches in ("both", "negative"), X0=target == "x0", HAS_MASK=mask is not None,
        STORE_GRAD=store_grad, RTNE_BF16=_common.rtne_bf16(v_theta.dtype), INT64=int64,
        num_warps=num_warps,
    )
    loss_out = torch.empty((), dtype=cdt, device=dev)
    inv = torch.empty((), dtype=cdt, device=dev)
    _finish_kernel[(1,)](part, loss_out, inv, P, C, BLOCK=min(1024, triton.next_power_of_2(P)), num_warps=4)
    return loss_out, inv, grad


def _scale(grad: Tensor, grad_out: Tensor, inv: Tensor) -> Tensor:
    out = torch.empty_like(grad)
    numel = grad.numel()
    block = (1 << 18) if grad.device.type != "cuda" else 4096
    cdtype = _common.TL_DTYPE[_common.compute_dtype(grad.dtype)]
    _scale_kernel[(triton.cdiv(numel, block),)](grad, out, grad_out, inv, numel, CDTYPE=cdtype, BLOCK=block,
                                                RTNE_BF16=_common.rtne_bf16(grad.dtype),
                                                INT64=numel >= _INT32_LIMIT, num_warps=4)
    return out


class StepNFTLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward = fused kernel + finish; backward = ``grad * grad_out * inv`` (one launch).

    Only ``v_theta`` receives a gradient; every other input is rollout data.
    """

    @staticmethod
    def forward(ctx, v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor,
                std: Tensor, y: Tensor, mask: Tensor | None, kwargs: dict) -> Tensor:
        loss, inv, grad = stepnft_loss_forward(v_theta, v_old, x_t, x_next, A, B, std, y, mask,
                                               store_grad=True, **kwargs)
        ctx.save_for_backward(grad, inv)
        return loss

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad, inv = ctx.saved_tensors
        return (_scale(grad, grad_out, inv),) + (None,) * 9


def stepnft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor,
                 std: Tensor, y: Tensor, mask: Tensor | None = None, *, beta: float = 1.0, gamma: float = 1.0,
                 max_drift: float | None = 0.5, kl_coef: float = 1e-4, loss: LossKind = "ranking",
                 target: TargetKind = "next", branches: BranchKind = "both", t: Tensor | None = None,
                 x0: Tensor | None = None) -> Tensor:
    """The π-StepNFT objective, fused (SPEC S5-S7; S8 variants): drop-in for :func:`fastnft.nft.stepnft_loss`.

    Same signature, shapes and result as the reference (see it for every argument): ``v_theta, v_old, x_t,
    x_next`` (and ``x0``) are ``[N, C, D]`` float32 | bfloat16 (float16, float64 also accepted) of one dtype
    on one CUDA device (or CPU under ``TRITON_INTERPRET=1``); ``A, B, std, y, t`` are ``[N]`` floats;
    ``mask`` is ``[N]`` bool or None. Accumulation is float32 (float64 for float64 inputs). An all-false mask
    gives exactly 0 with a zero gradient, like the reference.

    Returns:
        0-d tensor, float32 (float64 for float64 inputs), differentiable w.r.t. ``v_theta`` only.

    Raises:
        ValueError: as the reference (shapes, dtypes, variant names), or mixed dtypes/devices.
        NotImplementedError: an input other than ``v_theta`` requires grad (use the reference for that).
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    kwargs = {"beta": beta, "gamma": gamma, "max_drift": max_drift, "kl_coef": kl_coef, "loss": loss,
              "target": target, "branches": branches, "t": t, "x0": x0}
    grad_on = torch.is_grad_enabled()
    if grad_on:
        others = (v_old, x_t, x_next, A, B, std, y, t, x0)
        if any(o is not None and o.requires_grad for o in others):
            raise NotImplementedError("the fused StepNFT loss differentiates w.r.t. v_theta only; another "
                                      "input requires grad: detach it or use fastnft.nft.stepnft_loss")
    if grad_on and v_theta.requires_grad:
        return StepNFTLossFunction.apply(v_theta, v_old, x_t, x_next, A, B, std, y, mask, kwargs)
    out = stepnft_loss_forward(v_theta, v_old, x_t, x_next, A, B, std, y, mask, store_grad=False, **kwargs)
    return out[0]
