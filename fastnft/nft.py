"""π-StepNFT losses in plain PyTorch (SPEC S5-S8): THE reference for the fused kernels, tests and benchmarks.

Shapes: ``[N, C, D]`` for velocities and sampler states (N samples, C executed-chunk tokens, D action dims);
``[N]`` for per-sample coefficients ``A, B, std`` of the supervised solver step, labels ``y`` and the mask.

Flow-GRPO reference algorithm (``algo: grpo``; not part of SPEC.md, stated here in its notation)
----------------------------------------------------------------------------------------------------
Sources: Flow-GRPO (Liu et al., 2025, arXiv 2505.05470: GRPO on the reverse-time Flow-SDE, PPO clipping per
denoising step) and pi_RL (arXiv 2510.25889: Flow-SDE for VLA policies, the S2 sampler used here).
Same rollouts (S2-S3), engine and EMA (S9) as StepNFT; only the labels and the per-row objective differ::

    G1 advantage    adv_e = (s_e - mean_G(s)) / (std_G(s) + adv_eps)    G rollouts per initial state (adjacent),
                    std_G = population std of the group; a unanimous group gives adv = 0 on all its episodes.
                    Every stored policy call of episode e gets adv_e (in place of S4's y; |adv| <= sqrt(G-1)).
    G2 likelihood   log p(x_next | x_t, v) = log N(x_next; A_i x_t + B_i v, std_i^2 I), summed over C tokens, D dims
    G3 log-ratio    mu_theta = A_i x_t + B_i v_theta,  mu_old = A_i x_t + B_i v_old,  r = x_next - mu_old
                    log rho = log p_theta - log p_old = -(||x_next - mu_theta||^2 - ||r||^2) / (2 std_i^2)
                            = sum_{C,D} B_i dv (2 r - B_i dv) / (2 std_i^2),   dv = v_theta - v_old
                    (the normalising constants cancel because mu is affine in v, S2a; std_i > 0 is required)
    G4 objective    L = -masked_mean_N( min(rho adv, clip(rho, 1 - clip_eps, 1 + clip_eps) adv) )
                        + kl_coef * masked_mean( mean_D (v_theta - v_old)^2 )     (S7's drift term, S7's reduction)

No critic, no learned value: the group mean is the baseline. At ``v_theta = v_old`` (rho = 1) the loss gradient is
minus the REINFORCE term ``adv B_i r / std_i^2`` per row (divided by the number of valid rows). ``v_old`` is the
EMA rollout policy's velocity (S3, S9), so the behaviour policy of the ratio is the EMA policy: at the start of an
iteration rho differs from 1 by however far the actor has moved past the EMA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DRIFT_EPS",
    "VAR_EPS",
    "BranchKind",
    "GRPOTerms",
    "LossKind",
    "StepNFTTerms",
    "TargetKind",
    "grpo_loss",
    "grpo_terms",
    "masked_token_mean",
    "stepnft_loss",
    "stepnft_terms",
]

LossKind = Literal["ranking", "wmse"]
TargetKind = Literal["next", "x0"]
BranchKind = Literal["both", "positive", "negative"]

VAR_EPS = 1e-4  # S6: var = std^2 + 1e-4
DRIFT_EPS = 1e-8  # S5: clip factor denominator


@dataclass
class StepNFTTerms:
    """Per-token pieces of the StepNFT objective (all ``[N, C]``, dtype of the computation).

    Attributes:
        loss_tok: loss per token before reduction (S7 / S8), without the KL term.
        kl_tok: ``mean over D (v_theta - v_old)^2`` per token.
        logit: ``(gamma / 2) * y * (E+ - E-)`` for the ranking loss (the softplus argument); for wMSE the
            same quantity, kept for logging.
        e_pos, e_neg: variance-normalised step errors E+ and E- (S6).
        clip_scale: drift-clip factor ``min(1, max_drift / ||dv||)`` (1 where the clip is off).
    """

    loss_tok: Tensor
    kl_tok: Tensor
    logit: Tensor
    e_pos: Tensor
    e_neg: Tensor
    clip_scale: Tensor


def _check(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor, std: Tensor,
           y: Tensor, mask: Tensor | None, y_name: str = "y") -> None:
    if v_theta.dim() != 3:
        raise ValueError(f"v_theta must be [N, C, D], got shape {tuple(v_theta.shape)}")
    for name, tns in (("v_old", v_old), ("x_t", x_t), ("x_next", x_next)):
        if tns.shape != v_theta.shape:
            raise ValueError(f"{name} must have v_theta's shape {tuple(v_theta.shape)}, got {tuple(tns.shape)}")
    N = v_theta.shape[0]
    for name, tns in (("A", A), ("B", B), ("std", std), (y_name, y)):
        if tns.shape != (N,):
            raise ValueError(f"{name} must be a per-sample [N] = [{N}] tensor, got shape {tuple(tns.shape)}")
    if mask is not None and (mask.shape != (N,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a [N] = [{N}] bool tensor or None, got {tuple(mask.shape)} {mask.dtype}")


def stepnft_terms(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor,
                  std: Tensor, y: Tensor, *, beta: float = 1.0, gamma: float = 1.0,
                  max_drift: float | None = 0.5, loss: LossKind = "ranking", target: TargetKind = "next",
                  branches: BranchKind = "both", t: Tensor | None = None, x0: Tensor | None = None) -> StepNFTTerms:
    """Per-token StepNFT terms (SPEC S5-S8). See :func:`stepnft_loss` for the arguments.

    With ``target="x0"`` (S8 terminal supervision) the branch predictions are ``x0± = x_t - t v±`` compared with
    the rollout's final sample ``x0``: the same algebra as the next-step target with ``A -> 1``, ``B -> -t``,
    ``x_next -> x0``, which is how it is computed here (and in the fused kernel).
    """
    f32 = torch.float64 if v_theta.dtype == torch.float64 else torch.float32
    vt, vo, xt, xn = (u.to(f32) for u in (v_theta, v_old, x_t, x_next))
    A_, B_, sd, y_ = (u.to(f32) for u in (A, B, std, y))
    var = (sd**2 + VAR_EPS).view(-1, 1)  # S6, constant w.r.t. theta
    if target == "x0":
        if t is None or x0 is None:
            raise ValueError("target='x0' needs t ([N] solver time t_i) and x0 ([N, C, D] final rollout sample)")
        A_ = torch.ones_like(A_)
        B_ = -t.to(f32)
        xn = x0.to(f32)
    elif target != "next":
        raise ValueError(f"target must be 'next' or 'x0', got {target!r}")
    vo = vo.detach()
    dv = vt - vo  # S5
    if max_drift is not None:
        norm = dv.norm(dim=-1, keepdim=True)
        scale = torch.clamp(max_drift / (norm + DRIFT_EPS), max=1.0)  # not detached (S5)
        dv_c = dv * scale
        clip_scale = scale.squeeze(-1)
    else:
        dv_c = dv
        clip_scale = torch.ones(dv.shape[:-1], dtype=f32, device=dv.device)
    A3, B3 = A_.view(-1, 1, 1), B_.view(-1, 1, 1)
    mu_old = A3 * xt + B3 * vo
    r = xn - mu_old  # rollout residual
    shift = beta * B3 * dv_c  # mu± = mu_old ± shift
    e_pos = ((r - shift) ** 2).sum(-1) / var  # S6
    e_neg = ((r + shift) ** 2).sum(-1) / var
    y2 = y_.view(-1, 1)
    logit = 0.5 * gamma * y2 * (e_pos - e_neg)
    if loss == "ranking":
        if branches == "both":
            arg = logit
        else:
            # Single-branch ablation: rank one mirrored branch against the rollout mean mu_old (E_0) instead of
            # against the other branch. The two halves add up to the full logit: (E+ - E0) + (E0 - E-) = E+ - E-.
            e0 = (r**2).sum(-1) / var
            if branches == "positive":
                arg = 0.5 * gamma * y2 * (e_pos - e0)
            elif branches == "negative":
                arg = 0.5 * gamma * y2 * (e0 - e_neg)
            else:
                raise ValueError(f"branches must be 'both', 'positive' or 'negative', got {branches!r}")
        loss_tok = F.softplus(arg)  # S7
    elif loss == "wmse":
        rr = (0.5 * (y2 + 1.0))  # r = (y + 1) / 2 in [0, 1]
        if branches == "both":
            loss_tok = rr * e_pos + (1.0 - rr) * e_neg  # S8 DiffusionNFT-style
        elif branches == "positive":
            loss_tok = rr * e_pos
        elif branches == "negative":
            loss_tok = (1.0 - rr) * e_neg
        else:
            raise ValueError(f"branches must be 'both', 'positive' or 'negative', got {branches!r}")
    else:
        raise ValueError(f"loss must be 'ranking' or 'wmse', got {loss!r}")
    kl_tok = ((vt - vo) ** 2).mean(-1)
    return StepNFTTerms(loss_tok=loss_tok, kl_tok=kl_tok, logit=logit, e_pos=e_pos, e_neg=e_neg,
                        clip_scale=clip_scale)


def masked_token_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """S7's reduction: mean over the C chunk tokens, then mean over valid samples.

    Args:
        x: ``[N, C]`` per-token values.
        mask: ``[N]`` bool or None (all valid).

    Returns:
        0-d tensor. With an all-false mask the result is 0 (and its gradient 0), so a micro-batch without valid
        samples is a no-op rather than NaN.
    """
    per_sample = x.mean(-1)
    if mask is None:
        return per_sample.mean()
    m = mask.to(per_sample.dtype)
    return (per_sample * m).sum() / m.sum().clamp(min=1.0)


def stepnft_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor, std: Tensor,
                 y: Tensor, mask: Tensor | None = None, *, beta: float = 1.0, gamma: float = 1.0,
                 max_drift: float | None = 0.5, kl_coef: float = 1e-4, loss: LossKind = "ranking",
                 target: TargetKind = "next", branches: BranchKind = "both", t: Tensor | None = None,
                 x0: Tensor | None = None) -> Tensor:
    """The π-StepNFT objective (SPEC S5-S7; variants S8), differentiable in ``v_theta``.

    ``L = masked_mean( softplus((gamma/2) y (E+ - E-)) ) + kl_coef * masked_mean( mean_D (v_theta - v_old)^2 )``
    with mirrored branches ``v± = v_old ± beta dv_c`` (S5) and ``E± = sum_D (x_next - mu±)^2 / (std^2 + 1e-4)``
    (S6). Paper Eq. 3 (affine mean), Sec. 4.1-4.2.

    Args:
        v_theta: ``[N, C, D]`` float32/bf16/float64, current policy velocity at ``(x_t, t_i)``; requires grad.
        v_old: ``[N, C, D]`` velocity the rollout (EMA) policy produced at that step (treated as a constant).
        x_t: ``[N, C, D]`` sampler state at the supervised step.
        x_next: ``[N, C, D]`` the observed next sampler state.
        A, B, std: ``[N]`` coefficients of the supervised step i (SPEC S2).
        y: ``[N]`` labels in [-1, 1] (``2r - 1``; S4).
        mask: ``[N]`` bool, False for samples to ignore (after the episode ended); None = all valid.
            All-false gives a loss of exactly 0 with zero gradient.
        beta: trust region (branch half-width), default 1.0.
        gamma: logistic temperature ("dpo beta"), default 1.0.
        max_drift: per-token L2 clip of ``dv`` over D, default 0.5; None disables the clip.
        kl_coef: weight of the velocity-drift penalty, default 1e-4.
        loss: ``"ranking"`` (S7) or ``"wmse"`` (S8).
        target: ``"next"`` (step-wise, default) or ``"x0"`` (terminal supervision, S8; needs ``t`` and ``x0``).
        branches: ``"both"``, or a single-branch ablation ``"positive"`` / ``"negative"`` (S8).
        t: ``[N]`` solver time ``t_i`` of the supervised step (only for ``target="x0"``).
        x0: ``[N, C, D]`` the rollout's final sample (only for ``target="x0"``).

    Returns:
        0-d tensor in float32 (float64 for float64 inputs).

    Raises:
        ValueError: shapes or dtypes inconsistent, or an unknown variant name.
    """
    _check(v_theta, v_old, x_t, x_next, A, B, std, y, mask)
    terms = stepnft_terms(v_theta, v_old, x_t, x_next, A, B, std, y, beta=beta, gamma=gamma, max_drift=max_drift,
                          loss=loss, target=target, branches=branches, t=t, x0=x0)
    out = masked_token_mean(terms.loss_tok, mask)
    if kl_coef:
        out = out + kl_coef * masked_token_mean(terms.kl_tok, mask)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Flow-GRPO reference algorithm (module docstring, G1-G4)

@dataclass
class GRPOTerms:
    """Per-row pieces of the Flow-GRPO objective (G2-G4), dtype of the computation (float32 or float64).

    Attributes:
        loss_sample: ``[N]`` ``-min(rho adv, clip(rho) adv)`` per row, before the mask and without the KL term.
        log_ratio: ``[N]`` ``log p_theta(x_next) - log p_old(x_next)`` summed over C and D (G3), before any clamp.
        ratio: ``[N]`` ``rho = exp(log_ratio)`` (of the clamped log-ratio when ``log_ratio_clamp`` is set).
        clipped: ``[N]`` bool, True where the clipped branch is the minimum and constant (``rho > 1 + eps`` with
            ``adv > 0``, or ``rho < 1 - eps`` with ``adv < 0``): those rows give no policy gradient.
        kl_tok: ``[N, C]`` ``mean over D (v_theta - v_old)^2`` per token (S7's drift term).
    """

    loss_sample: Tensor
    log_ratio: Tensor
    ratio: Tensor
    clipped: Tensor
    kl_tok: Tensor


def grpo_terms(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor, std: Tensor,
               adv: Tensor, *, clip_eps: float = 0.2, log_ratio_clamp: float | None = 20.0) -> GRPOTerms:
    """Per-row Flow-GRPO terms (module docstring G2-G4). See :func:`grpo_loss` for the arguments.

    The log-ratio is computed from the residual ``r = x_next - mu_old`` and ``dv`` (G3's second form) rather than
    as a difference of two squared norms, which would cancel catastrophically in float32 when ``dv`` is small.

    Raises:
        ValueError: ``clip_eps`` not in (0, 1), ``log_ratio_clamp`` not positive, or a non-positive ``std``.
    """
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1) (PPO / Flow-GRPO default 0.2), got {clip_eps!r}")
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 or None, got {log_ratio_clamp!r}")
    f32 = torch.float64 if v_theta.dtype == torch.float64 else torch.float32
    vt, vo, xt, xn = (u.to(f32) for u in (v_theta, v_old, x_t, x_next))
    A_, B_, sd, adv_ = (u.to(f32) for u in (A, B, std, adv))
    # std = 0 (ODE rollouts or a = 0) makes the Gaussian likelihood a point mass: the ratio is undefined.
    if bool((sd <= 0).any()):
        raise ValueError("std must be > 0 for every row: the Flow-GRPO likelihood needs SDE rollouts with "
                         "nft.noise_level > 0 (nft.rollout: sde)")
    vo = vo.detach()
    A3, B3 = A_.view(-1, 1, 1), B_.view(-1, 1, 1)
    r = xn - (A3 * xt + B3 * vo)  # residual of the rollout mean mu_old
    dv = vt - vo
    bdv = B3 * dv  # mu_theta - mu_old (S2a: affine in v)
    log_ratio = (bdv * (2.0 * r - bdv)).sum((1, 2)) / (2.0 * sd**2)  # G3
    lr = log_ratio if log_ratio_clamp is None else log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(lr)
    surr = ratio * adv_
    surr_clip = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv_
    loss_sample = -torch.minimum(surr, surr_clip)  # G4 (PPO clipped surrogate, no critic)
    clipped = ((adv_ > 0) & (ratio > 1.0 + clip_eps)) | ((adv_ < 0) & (ratio < 1.0 - clip_eps))
    kl_tok = (dv**2).mean(-1)
    return GRPOTerms(loss_sample=loss_sample, log_ratio=log_ratio, ratio=ratio, clipped=clipped, kl_tok=kl_tok)


def grpo_loss(v_theta: Tensor, v_old: Tensor, x_t: Tensor, x_next: Tensor, A: Tensor, B: Tensor, std: Tensor,
              adv: Tensor, mask: Tensor | None = None, *, clip_eps: float = 0.2, kl_coef: float = 0.0,
              log_ratio_clamp: float | None = 20.0) -> Tensor:
    """The Flow-GRPO objective (module docstring G2-G4; Flow-GRPO, Liu et al. 2025; pi_RL, arXiv 2510.25889).

    ``L = -masked_mean( min(rho adv, clip(rho, 1 - clip_eps, 1 + clip_eps) adv) )
    + kl_coef * masked_mean( mean_D (v_theta - v_old)^2 )`` with the per-row likelihood ratio of the recorded SDE
    step ``rho = N(x_next; mu_theta, std^2 I) / N(x_next; mu_old, std^2 I)`` (product over C tokens and D dims).
    Same positional arguments as :func:`stepnft_loss`, with the advantage in place of the label.

    Args:
        v_theta: ``[N, C, D]`` float32/bf16/float64 velocity of the live actor at ``(x_t, t_i)``; requires grad.
        v_old: ``[N, C, D]`` velocity the rollout (EMA) policy produced at that step (treated as a constant).
        x_t: ``[N, C, D]`` sampler state at the recorded step.
        x_next: ``[N, C, D]`` the observed next sampler state.
        A, B, std: ``[N]`` coefficients of the recorded step i (SPEC S2); ``std`` must be > 0.
        adv: ``[N]`` group-relative advantage of the row's episode (G1; not bounded by 1, ``|adv| <= sqrt(G-1)``).
        mask: ``[N]`` bool, False for rows to ignore; None = all valid. Reduction as S7 (mean over valid rows;
            all-false gives exactly 0 with zero gradient).
        clip_eps: PPO clip half-width, in (0, 1); default 0.2 (Flow-GRPO / PPO).
        kl_coef: weight of S7's velocity-drift penalty; default 0 (the clip is the trust region).
        log_ratio_clamp: clamp of the log-ratio before ``exp`` (a float32 overflow guard, as PPO implementations
            such as verl do with 20); it lies far outside the clip range, so it only zeroes the gradient of rows
            with ``adv < 0`` and ``rho > e^20``. None disables it.

    Returns:
        0-d tensor in float32 (float64 for float64 inputs).

    Raises:
        ValueError: inconsistent shapes/dtypes, ``clip_eps`` outside (0, 1), or ``std <= 0`` somewhere.
    """
    _check(v_theta, v_old, x_t, x_next, A, B, std, adv, mask, y_name="adv")
    terms = grpo_terms(v_theta, v_old, x_t, x_next, A, B, std, adv, clip_eps=clip_eps,
                       log_ratio_clamp=log_ratio_clamp)
    out = masked_token_mean(terms.loss_sample.unsqueeze(-1), mask)
    if kl_coef:
        out = out + kl_coef * masked_token_mean(terms.kl_tok, mask)
    return out
