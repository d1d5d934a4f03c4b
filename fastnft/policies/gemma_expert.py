"""The Gemma-shaped action expert of pi0 / pi0.5 (openpi's ``gemma_300m``), without token embeddings or LM head.

Its parameter names follow ``transformers``' Gemma (``model.layers.{i}.self_attn.q_proj.weight``, ...), so the
expert's state dict is the ``paligemma_with_expert.gemma_expert.*`` part of an openpi / lerobot checkpoint as is.
pi0.5 replaces each RMSNorm gain by adaRMSNorm: a zero-initialised ``dense`` layer maps the time condition to
``(scale, shift, gate)``; the gate multiplies the residual branch (openpi's adaRMS; key ``*.dense.weight/bias``).

The attention itself is not here: :mod:`fastnft.policies.pi0` runs each expert layer together with the prefix's
keys and values (``K, V = cat[prefix, suffix]``), through :func:`norm_forward` and the projections below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnft.policies.pi0_config import ExpertConfig

__all__ = ["AdaRMSNorm", "ExpertLayer", "GemmaExpert", "RMSNorm", "norm_forward"]


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x / rms(x) * (1 + weight)`` in float32, cast back to the input dtype. ``weight``: ``[dim]``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class AdaRMSNorm(nn.Module):
    """Adaptive RMSNorm (pi0.5): ``x / rms(x) * (1 + scale) + shift`` and a residual ``gate``.

    ``dense: Linear(cond_dim, 3 * dim)`` is zero-initialised (weight), so a fresh layer is a plain RMSNorm up to
    the bias. Input ``x [B, S, dim]``, ``cond [B, cond_dim]``; returns ``(y [B, S, dim], gate [B, 1, dim])``.
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond).float()[:, None, :].chunk(3, dim=-1)
        return (y * (1.0 + scale) + shift).type_as(x), gate.type_as(x)


def norm_forward(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Apply a Gemma RMSNorm (``transformers``' or :class:`RMSNorm`) or :class:`AdaRMSNorm`; ``(y, gate or None)``."""
    if isinstance(norm, AdaRMSNorm):
        if cond is None:
            raise ValueError("adaRMSNorm (pi0.5) needs the time condition; got cond=None")
        return norm(x, cond)
    return norm(x), None


class _Attention(nn.Module):
    def __init__(self, cfg: ExpertConfig) -> None:
        super().__init__()
        w, hd = cfg.width, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(w, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(w, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(w, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, w, bias=False)


class _MLP(nn.Module):
    """Gemma's gated MLP: ``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, cfg: ExpertConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.width, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class ExpertLayer(nn.Module):
    """One expert layer's weights: ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
    ``mlp.{gate,up,down}_proj``; the norms are adaRMSNorm when ``adarms``."""

    def __init__(self, cfg: ExpertConfig, adarms: bool, eps: float) -> None:
        super().__init__()
        norm = (lambda: AdaRMSNorm(cfg.width, cfg.width, eps)) if adarms else (lambda: RMSNorm(cfg.width, eps))
        self.input_layernorm = norm()
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = norm()
        self.mlp = _MLP(cfg)


class _ExpertModel(nn.Module):
    def __init__(self, cfg: ExpertConfig, adarms: bool, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ExpertLayer(cfg, adarms, eps) for _ in range(cfg.depth))
        self.norm = AdaRMSNorm(cfg.width, cfg.width, eps) if adarms else RMSNorm(cfg.width, eps)


class GemmaExpert(nn.Module):
    """Container with the ``model.layers`` / ``model.norm`` names of ``transformers``' GemmaForCausalLM.

    Args:
        cfg: expert sizes (width, depth, mlp, heads, kv heads, head dim).
        adarms: pi0.5's adaRMSNorm (condition width = ``cfg.width``).
        eps: RMSNorm epsilon.
    """

    def __init__(self, cfg: ExpertConfig, adarms: bool, eps: float = 1e-6) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _ExpertModel(cfg, adarms, eps)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Gemma's initialisation: normal(0, std) projections; norm gains and adaRMS weights stay zero."""
        for name, p in self.named_parameters():
            if name.endswith("_proj.weight"):
                nn.init.normal_(p, std=std)
