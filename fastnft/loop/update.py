"""Actor update of one iteration: update epochs over shuffled micro-batches of the rollout buffer (SPEC S5-S8).

``v_theta`` is recomputed by the live actor at the stored ``(x_t, t_i, obs)``; ``v_old``, ``x_next`` and the
solver index come from the buffer. Only the first C (executed) tokens are supervised.

The objective is StepNFT (``loss_fn`` = ``stepnft_loss`` or its fused kernel, kwargs from ``nft``) unless a
``grpo`` config is passed: then it is the Flow-GRPO reference (``loss_fn`` = :func:`fastnft.nft.grpo_loss`, kwargs
from ``grpo``, buffer labels ``y`` = group-relative advantages; ``fastnft/nft.py`` G1-G4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from fastnft.config import GRPOConfig, NFTConfig
from fastnft.devices import check_generator
from fastnft.loop.rollout import RolloutBuffer
from fastnft.nft import grpo_terms, masked_token_mean, stepnft_terms
from fastnft.sde import FlowSDESchedule

__all__ = ["LossFn", "buffer_loss", "gradient_signal", "grpo_loss_kwargs", "loss_diagnostics", "nft_loss_kwargs",
           "update_actor"]

LossFn = Callable[..., Tensor]


class _Engine(Protocol):
    module: torch.nn.Module

    def train_step(self, loss: Tensor) -> dict: ...


def nft_loss_kwargs(nft: NFTConfig) -> dict:
    """Keyword arguments of ``stepnft_loss`` taken from the config (S5-S8)."""
    return {"beta": nft.beta, "gamma": nft.gamma, "max_drift": nft.max_drift, "kl_coef": nft.kl_coef,
            "loss": nft.loss, "target": nft.target, "branches": nft.branches}


def grpo_loss_kwargs(grpo: GRPOConfig) -> dict:
    """Keyword arguments of ``fastnft.nft.grpo_loss`` taken from the config (G3-G4)."""
    return {"clip_eps": grpo.clip_eps, "kl_coef": grpo.kl_coef, "log_ratio_clamp": grpo.log_ratio_clamp}


def _loss_inputs(module: torch.nn.Module, mb: RolloutBuffer, sch: FlowSDESchedule, C: int, target: str):
    i = mb.step
    t = sch.t[i]
    v_theta = module(mb.x_t, t, mb.obs)[:, :C]
    extra = {"t": t, "x0": mb.x0[:, :C]} if target == "x0" else {}
    return (v_theta, mb.v_old[:, :C], mb.x_t[:, :C], mb.x_next[:, :C], sch.A[i], sch.B[i], sch.std[i], mb.y), extra


def buffer_loss(module: torch.nn.Module, mb: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int,
                loss_fn: LossFn, grpo: GRPOConfig | None = None) -> Tensor:
    """StepNFT (or, with ``grpo``, Flow-GRPO) loss of a micro-batch under ``module`` (differentiable).

    Args:
        module: actor (a FlowPolicy under the engine); ``module(x_t [M, H, D], t [M], obs) -> v [M, H, D]``,
            ``obs`` the buffer rows' observations (tensor, dict or pi0 prefix context).
        mb: rows of the rollout buffer.
        sch: the ROLLOUT schedule (its A, B, std generated ``x_next``), float32 on the buffer's device.
        nft: objective config.
        C: executed steps per policy call (``policy.n_action_steps``).
        loss_fn: ``fastnft.nft.stepnft_loss`` or the fused kernel (same signature); ``fastnft.nft.grpo_loss``
            when ``grpo`` is given.
        grpo: the Flow-GRPO config for ``algo: grpo``; None = StepNFT.
    """
    args, extra = _loss_inputs(module, mb, sch, C, nft.target)
    if grpo is not None:
        return loss_fn(*args, None, **grpo_loss_kwargs(grpo))
    return loss_fn(*args, None, **nft_loss_kwargs(nft), **extra)


@torch.no_grad()
def loss_diagnostics(module: torch.nn.Module, buf: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int,
                     max_rows: int = 256, prefix: str = "", grpo: GRPOConfig | None = None) -> dict[str, float]:
    """Logit statistics, branch separation vs noise, clip activity and the loss on (a subsample of) ``buf``.

    The trainer calls it twice every iteration (``fresh/`` before the update, ``replayed/`` after), so it reads at
    most ``max_rows`` rows, evenly spaced over the buffer (no random draw: the training's generators are not
    touched). With the main job's policy and a 4096-row buffer both calls took 0.08 s of an iteration at 256 rows
    (``bench/diagnostics_cost.json``) and 1.6 s of wall (0.84 s of CPU) when they read 4096 rows
    (``bench/diagnostics_cost_4096rows.json``), on a shared 2-core machine.

    ``sep_over_std`` = mean over tokens of ``beta |B_i| ||dv_c|| / std_i``: how far the mirrored branch means sit
    from the rollout mean in units of the step's noise; large values saturate the logistic.

    With ``grpo`` (Flow-GRPO) the keys are ``loss``, ``ratio_mean``, ``ratio_std``, ``log_ratio_abs`` (mean
    ``|log rho|``), ``clip_frac`` (share of rows whose clipped branch is active, i.e. that give no gradient),
    ``ratio_out`` (share with ``|rho - 1| > clip_eps``, PPO's usual clip fraction) and ``drift``.
    """
    M = len(buf)
    if M > max_rows:  # evenly spaced over the whole buffer (every episode and call position), deterministic
        rows = torch.div(torch.arange(max_rows, device=buf.step.device) * M, max_rows, rounding_mode="floor")
    else:
        rows = torch.arange(M, device=buf.step.device)
    mb = buf.index(rows)
    args, extra = _loss_inputs(module, mb, sch, C, nft.target)
    if grpo is not None:
        kw = grpo_loss_kwargs(grpo)
        kl_coef = kw.pop("kl_coef")
        g = grpo_terms(*args, **kw)
        loss = masked_token_mean(g.loss_sample.unsqueeze(-1), None) + kl_coef * masked_token_mean(g.kl_tok, None)
        ratio = g.ratio.float()
        return {
            f"{prefix}loss": float(loss),
            f"{prefix}ratio_mean": float(ratio.mean()),
            f"{prefix}ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
            f"{prefix}log_ratio_abs": float(g.log_ratio.abs().mean()),
            f"{prefix}clip_frac": float(g.clipped.float().mean()),
            f"{prefix}ratio_out": float(((ratio - 1).abs() > grpo.clip_eps).float().mean()),
            f"{prefix}drift": float((args[0].float() - args[1].float()).norm(dim=-1).mean()),
        }
    kw = nft_loss_kwargs(nft)
    kw.pop("kl_coef")
    terms = stepnft_terms(*args, **kw, **extra)
    v_theta, v_old = args[0].float(), args[1].float()
    dv = (v_theta - v_old)
    dv_n = dv.norm(dim=-1) * terms.clip_scale
    B, std = args[5].float().abs().view(-1, 1), args[6].float().view(-1, 1)
    sep = nft.beta * B * dv_n / std.clamp(min=1e-6)
    loss = masked_token_mean(terms.loss_tok, None) + nft.kl_coef * masked_token_mean(terms.kl_tok, None)
    logit = terms.logit
    return {
        f"{prefix}loss": float(loss),
        f"{prefix}logit_mean": float(logit.mean()),
        f"{prefix}logit_abs": float(logit.abs().mean()),
        f"{prefix}logit_std": float(logit.std()) if logit.numel() > 1 else 0.0,
        f"{prefix}sep_over_std": float(sep.mean()),
        f"{prefix}clip_active": float((terms.clip_scale < 1).float().mean()),
        f"{prefix}drift": float(dv.norm(dim=-1).mean()),
    }


def _flat_grad(module: torch.nn.Module, loss: Tensor) -> Tensor:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads)])


def gradient_signal(module: torch.nn.Module, buf: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int,
                    loss_fn: LossFn, generator: torch.Generator, max_rows: int = 4096,
                    grpo: GRPOConfig | None = None) -> dict[str, float]:
    """Does this iteration's gradient carry label signal? Two diagnostics on the live actor.

    - ``signal/cos_halves``: cosine between the loss gradients of two random halves of the buffer, split by
      episode (rows of one episode share a label). Pure noise gives ~0; a shared direction gives > 0. For a
      gradient ``g = s + n`` with signal ``s`` and noise ``n`` it estimates ``|s|^2 / (|s|^2 + |n_half|^2)``.
    - ``signal/label_share``: ``1 - |g_shuffled|^2 / |g|^2``, where ``g_shuffled`` is the gradient of the same
      rows with the episode labels permuted across episodes. Labels independent of the injected noise leave
      only the noise part, so this estimates the share of the squared gradient norm that the labels explain
      (noisy; negative when the real labels explain nothing).
    - ``signal/grad_norm``: the full gradient's norm (before any clipping).

    Uses plain autograd on ``module``'s trainable parameters (no optimizer state is touched); with ZeRO-3 the
    parameters are partitioned, so the caller skips it there.

    Args:
        module: the actor.
        buf: the iteration's rollout buffer (labels ``y`` per row, ``episode`` ids).
        sch, nft, C, loss_fn, grpo: as in :func:`buffer_loss` (with ``grpo`` the labels are advantages).
        generator: RNG of the split and the permutation.
        max_rows: at most this many rows (a random subset) enter the three backward passes.
    """
    M = len(buf)
    dev = buf.step.device
    check_generator(generator, buf.step, "gradient-signal split")
    rows = torch.randperm(M, generator=generator, device=dev)[:max_rows]
    mb = buf.index(rows)
    if not any(p.requires_grad for p in module.parameters()):
        return {}  # nothing trains (e.g. a frozen module): no gradient to diagnose
    eps, inv = torch.unique(mb.episode, return_inverse=True)
    E = int(eps.numel())
    if E < 4:
        return {}
    ep_y = torch.zeros(E, device=dev, dtype=mb.y.dtype).scatter_(0, inv, mb.y)
    perm = torch.randperm(E, generator=generator, device=dev)
    half = torch.zeros(E, dtype=torch.bool, device=dev)
    half[perm[: E // 2]] = True
    in_a = half[inv]
    was_training = module.training
    module.train()
    with torch.enable_grad():
        g = _flat_grad(module, buffer_loss(module, mb, sch, nft, C, loss_fn, grpo))
        g_a = _flat_grad(module, buffer_loss(module, mb.index(in_a.nonzero().squeeze(1)), sch, nft, C, loss_fn,
                                             grpo))
        g_b = _flat_grad(module, buffer_loss(module, mb.index((~in_a).nonzero().squeeze(1)), sch, nft, C, loss_fn,
                                             grpo))
        shuf = mb.index(torch.arange(len(mb), device=dev))
        shuf.y = ep_y[torch.randperm(E, generator=generator, device=dev)][inv]
        g_s = _flat_grad(module, buffer_loss(module, shuf, sch, nft, C, loss_fn, grpo))
    module.train(was_training)
    gn2 = float(g.pow(2).sum())
    cos = float(torch.nn.functional.cosine_similarity(g_a, g_b, dim=0))
    return {"signal/cos_halves": cos,
            "signal/label_share": 1.0 - float(g_s.pow(2).sum()) / max(gn2, 1e-30),
            "signal/grad_norm": gn2 ** 0.5}


def update_actor(engine: _Engine, buf: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int, *,
                 update_epochs: int, micro_batch: int, loss_fn: LossFn,
                 generator: torch.Generator, grpo: GRPOConfig | None = None) -> dict[str, float]:
    """Update epochs x shuffled micro-batches; one optimizer step per micro-batch.

    ``grpo``: the Flow-GRPO config (``loss_fn`` is then ``fastnft.nft.grpo_loss``); None = StepNFT.
    ``generator`` shuffles on the buffer's device (fastnft.devices' draw rule). Losses stay on the device until
    the end; the engine still reads each micro-batch's gradient norm as a Python float (one host sync per step,
    which DeepSpeed's norm clipping forces anyway).

    With several ranks each rank steps on its own buffer. Every rank must take the same number of steps (DeepSpeed
    averages gradients collectively), so the caller trims all buffers to the smallest one first.

    Returns:
        Mean loss, mean grad norm and step count.
    """
    M = len(buf)
    losses, norms, steps = [], [], 0
    engine.module.train()
    for _ in range(update_epochs):
        check_generator(generator, buf.step, "update shuffling")
        perm = torch.randperm(M, generator=generator, device=buf.step.device)
        for s in range(0, M, micro_batch):
            mb = buf.index(perm[s:s + micro_batch])
            loss = buffer_loss(engine.module, mb, sch, nft, C, loss_fn, grpo)
            out = engine.train_step(loss)
            losses.append(loss.detach())
            if out.get("grad_norm") is not None:
                norms.append(float(out["grad_norm"]))
            steps += 1
    return {"update/loss": float(torch.stack(losses).double().mean()) if losses else 0.0,
            "update/grad_norm": sum(norms) / max(len(norms), 1) if norms else float("nan"),
            "update/steps": float(steps)}
