"""Actor update of one iteration: update epochs over shuffled micro-batches of the rollout buffer (SPEC S5-S8).

``v_theta`` is recomputed by the live actor at the stored ``(x_t, t_i, obs)``; ``v_old``, ``x_next`` and the
solver index come from the buffer. Only the first C (executed) tokens are supervised.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from fastnft.config import NFTConfig
from fastnft.devices import check_generator
from fastnft.nft import masked_token_mean, stepnft_terms
from fastnft.rollout import RolloutBuffer
from fastnft.sde import FlowSDESchedule

__all__ = ["LossFn", "buffer_loss", "loss_diagnostics", "nft_loss_kwargs", "update_actor"]

LossFn = Callable[..., Tensor]


class _Engine(Protocol):
    module: torch.nn.Module

    def train_step(self, loss: Tensor) -> dict: ...


def nft_loss_kwargs(nft: NFTConfig) -> dict:
    """Keyword arguments of ``stepnft_loss`` taken from the config (S5-S8)."""
    return {"beta": nft.beta, "gamma": nft.gamma, "max_drift": nft.max_drift, "kl_coef": nft.kl_coef,
            "loss": nft.loss, "target": nft.target, "branches": nft.branches}


def _loss_inputs(module: torch.nn.Module, mb: RolloutBuffer, sch: FlowSDESchedule, C: int, target: str):
    i = mb.step
    t = sch.t[i]
    v_theta = module(mb.x_t, t, mb.obs)[:, :C]
    extra = {"t": t, "x0": mb.x0[:, :C]} if target == "x0" else {}
    return (v_theta, mb.v_old[:, :C], mb.x_t[:, :C], mb.x_next[:, :C], sch.A[i], sch.B[i], sch.std[i], mb.y), extra


def buffer_loss(module: torch.nn.Module, mb: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int,
                loss_fn: LossFn) -> Tensor:
    """StepNFT loss of a micro-batch under ``module`` (differentiable).

    Args:
        module: actor; ``module(x_t [M, H, D], t [M], obs [M, obs_dim]) -> v [M, H, D]``.
        mb: rows of the rollout buffer.
        sch: the ROLLOUT schedule (its A, B, std generated ``x_next``), float32 on the buffer's device.
        nft: objective config.
        C: executed chunk length.
        loss_fn: ``fastnft.nft.stepnft_loss`` or the fused kernel (same signature).
    """
    args, extra = _loss_inputs(module, mb, sch, C, nft.target)
    return loss_fn(*args, None, **nft_loss_kwargs(nft), **extra)


@torch.no_grad()
def loss_diagnostics(module: torch.nn.Module, buf: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int,
                     max_rows: int = 4096, prefix: str = "") -> dict[str, float]:
    """Logit statistics, branch separation vs noise, clip activity and the loss on (a subsample of) ``buf``.

    ``sep_over_std`` = mean over tokens of ``beta |B_i| ||dv_c|| / std_i``: how far the mirrored branch means sit
    from the rollout mean in units of the step's noise; large values saturate the logistic.
    """
    rows = torch.arange(min(len(buf), max_rows), device=buf.step.device)
    mb = buf.index(rows)
    args, extra = _loss_inputs(module, mb, sch, C, nft.target)
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


def update_actor(engine: _Engine, buf: RolloutBuffer, sch: FlowSDESchedule, nft: NFTConfig, C: int, *,
                 update_epochs: int, micro_batch: int, loss_fn: LossFn,
                 generator: torch.Generator) -> dict[str, float]:
    """Update epochs x shuffled micro-batches; one optimizer step per micro-batch.

    ``generator`` shuffles on the buffer's device (fastnft.devices' draw rule). Losses stay on the device until
    the end: one host sync per call, not per micro-batch.

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
            loss = buffer_loss(engine.module, mb, sch, nft, C, loss_fn)
            out = engine.train_step(loss)
            losses.append(loss.detach())
            if out.get("grad_norm") is not None:
                norms.append(float(out["grad_norm"]))
            steps += 1
    return {"update/loss": float(torch.stack(losses).double().mean()) if losses else 0.0,
            "update/grad_norm": sum(norms) / max(len(norms), 1) if norms else float("nan"),
            "update/steps": float(steps)}
