"""Observation processor of pi0 / pi0.5: normalisation, images and prompt tokens as steps outside the network.

As in lerobot, the network sees normalised tensors only; the statistics live here (and in the checkpoint next to
the weights), so the same network runs with other robots' statistics. One call runs the steps in order:

1. state: ``observation.state [B, state_dim]`` -> normalised, zero-padded ``state [B, max_state_dim]``;
2. images: ``observation.images.<camera> [B, H, W, 3] | [B, 3, H, W]`` (uint8 or float in [0, 1]) for each
   configured camera -> ``images [B, N_cam, 3, S, S]`` in [-1, 1] and ``image_masks [B, N_cam]`` (a missing
   camera is a black image with mask False);
3. language: ``task`` (a string or B strings) -> ``lang_tokens, lang_masks [B, L]``; pi0.5's prompt also holds
   the discretised state. Pre-tokenised ``lang_tokens`` / ``lang_masks`` pass through.

Normalisation modes: ``mean_std`` ((x - mean) / std, pi0's default in lerobot and openpi) and ``quantile`` (q01 / q99
mapped to -1 / 1, pi0.5's default in both), or ``identity``; the epsilon follows the port that computed the
statistics (:meth:`NormStats.normalize`). Where a checkpoint's statistics come from: :mod:`fastnft.policies.pi0_stats`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from fastnft.envs.base import STATE_KEY, image_key  # the env writes the keys the processor reads
from fastnft.policies.image import siglip_pixels
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.tokenizer import ByteTokenizer, PromptTokenizer, make_tokenizer

__all__ = ["STATE_KEY", "NormStats", "Pi0Processor", "image_key"]

NormMode = Literal["mean_std", "quantile", "identity"]
NormConvention = Literal["openpi", "lerobot"]
_EPS = {"openpi": 1e-6, "lerobot": 1e-8}  # transforms.Normalize; lerobot _NormalizationMixin.eps


def _eps(convention: NormConvention, eps: float | None) -> float:
    if convention not in _EPS:
        raise ValueError(f"normalisation convention must be 'openpi' or 'lerobot', got {convention!r}")
    return _EPS[convention] if eps is None else eps


@dataclass
class NormStats:
    """Per-feature statistics, each ``[dim]`` float32 (the ones a mode does not use may be None)."""

    mean: Tensor | None = None
    std: Tensor | None = None
    q01: Tensor | None = None
    q99: Tensor | None = None

    @classmethod
    def fit(cls, x: Tensor) -> NormStats:
        """Estimate all four from samples ``x [M, dim]``."""
        x = x.float()
        return cls(x.mean(0), x.std(0), torch.quantile(x, 0.01, dim=0), torch.quantile(x, 0.99, dim=0))

    def normalize(self, x: Tensor, mode: NormMode, convention: NormConvention = "openpi",
                  eps: float | None = None) -> Tensor:
        """``[..., dim]`` -> normalised units (float32), with the formulas of the port the statistics come from.

        ``mean_std``: ``(x - mean) / (std + eps)`` in both ports. ``quantile``: ``2 (x - q01) / span - 1`` with
        ``span = q99 - q01 + eps`` (openpi ``transforms.Normalize``) or ``span = q99 - q01``, ``eps`` only where
        it is 0 (lerobot ``_NormalizationMixin``). Neither port clips: values outside [q01, q99] leave [-1, 1].
        ``eps`` defaults to the port's (openpi 1e-6, lerobot 1e-8).
        """
        x = x.float()
        if mode == "identity":
            return x
        eps = _eps(convention, eps)
        if mode == "mean_std":
            return (x - self.mean.to(x.device)) / (self.std.to(x.device) + eps)
        lo = self.q01.to(x.device)
        return 2.0 * (x - lo) / self._span(x.device, convention, eps) - 1.0

    def unnormalize(self, x: Tensor, mode: NormMode, convention: NormConvention = "openpi",
                    eps: float | None = None) -> Tensor:
        """Inverse of :meth:`normalize`; ``mean_std``: ``x (std + eps) + mean`` (openpi ``Unnormalize``) or
        ``x std + mean`` (lerobot)."""
        x = x.float()
        if mode == "identity":
            return x
        eps = _eps(convention, eps)
        if mode == "mean_std":
            std = self.std.to(x.device)
            return x * (std + eps if convention == "openpi" else std) + self.mean.to(x.device)
        return (x + 1.0) / 2.0 * self._span(x.device, convention, eps) + self.q01.to(x.device)

    def _span(self, device: torch.device, convention: NormConvention, eps: float) -> Tensor:
        lo, hi = self.q01.to(device), self.q99.to(device)
        if convention == "openpi":
            return hi - lo + eps
        return torch.where(hi == lo, torch.full_like(hi, eps), hi - lo)

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """Flat ``{prefix.mean: ..., ...}`` of the statistics that are set."""
        return {f"{prefix}.{k}": v.float().contiguous() for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_tensors(cls, d: dict[str, Tensor], prefix: str) -> NormStats:
        """Inverse of :meth:`tensors`."""
        return cls(**{k: d.get(f"{prefix}.{k}") for k in ("mean", "std", "q01", "q99")})


class Pi0Processor:
    """Raw observation dict -> the inputs of :class:`fastnft.policies.pi0.Pi0Model` (see the module docstring).

    Args:
        cfg: the policy config (cameras, dims, image size, prompt length, variant).
        tokenizer: prompt tokenizer; None = observations carry ``lang_tokens`` / ``lang_masks``.
        state_stats, action_stats: statistics; None with a non-identity mode raises.
        norm_mode: ``mean_std``, ``quantile`` or ``identity``.
        norm_convention: whose formulas (``openpi`` or ``lerobot``; they differ in the epsilon, see
            :meth:`NormStats.normalize`): the port that computed the statistics.
        norm_eps: the epsilon; None = the convention's (openpi 1e-6, lerobot 1e-8).

    Raises:
        ValueError: statistics missing for the mode, or of the wrong width.
    """

    def __init__(self, cfg: Pi0Config, tokenizer: PromptTokenizer | None = None, state_stats: NormStats | None = None,
                 action_stats: NormStats | None = None, norm_mode: NormMode = "mean_std",
                 norm_convention: NormConvention = "openpi", norm_eps: float | None = None) -> None:
        self.cfg, self.tokenizer, self.norm_mode = cfg, tokenizer, norm_mode
        self.norm_convention, self.norm_eps = norm_convention, _eps(norm_convention, norm_eps)
        self.state_stats, self.action_stats = state_stats or NormStats(), action_stats or NormStats()
        need = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99"), "identity": ()}[norm_mode]
        for name, st, dim in (("state", self.state_stats, cfg.state_dim), ("action", self.action_stats,
                                                                           cfg.action_dim)):
            for k in need:
                val = getattr(st, k)
                if val is None or val.shape != (dim,):
                    raise ValueError(f"normalisation '{norm_mode}' needs {name} statistic '{k}' of shape [{dim}] "
                                     f"(pi0.{name}_dim), got {None if val is None else tuple(val.shape)}")

    # -- steps --------------------------------------------------------------------------------------------------
    def state(self, obs: dict[str, Any], device: torch.device | str | None) -> Tensor:
        """Step 1: ``[B, state_dim]`` -> normalised ``[B, max_state_dim]`` (zero padding)."""
        s = torch.as_tensor(obs[STATE_KEY]).to(device)
        if s.shape[-1] != self.cfg.state_dim:
            raise ValueError(f"{STATE_KEY} has width {s.shape[-1]}, pi0.state_dim is {self.cfg.state_dim}")
        s = self.state_stats.normalize(s, self.norm_mode, self.norm_convention, self.norm_eps)
        return F.pad(s, (0, self.cfg.max_state_dim - s.shape[-1]))

    def images(self, obs: dict[str, Any], batch: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        """Step 2: every configured camera -> ``([B, N_cam, 3, S, S], [B, N_cam] bool)``."""
        S = self.cfg.vlm.image_size
        pix, masks = [], []
        for cam in self.cfg.cameras:
            img = obs.get(image_key(cam))
            if img is None:
                pix.append(torch.full((batch, 3, S, S), -1.0, device=device))
                masks.append(torch.zeros(batch, dtype=torch.bool, device=device))
            else:
                pix.append(siglip_pixels(torch.as_tensor(img), S, device))
                masks.append(torch.ones(batch, dtype=torch.bool, device=device))
        if not any(bool(m.any()) for m in masks):
            raise ValueError(f"no camera image in the observation; expected keys "
                             f"{[image_key(c) for c in self.cfg.cameras]}")
        return torch.stack(pix, 1), torch.stack(masks, 1)

    def language(self, obs: dict[str, Any], state: Tensor, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
        """Step 3: ``task`` -> ``(lang_tokens, lang_masks) [B, L]``; pre-tokenised inputs pass through."""
        if "lang_tokens" in obs:
            return torch.as_tensor(obs["lang_tokens"]).to(device), torch.as_tensor(obs["lang_masks"]).bool().to(device)
        if self.tokenizer is None:
            raise ValueError("observation has 'task' but the processor has no tokenizer; load the checkpoint with "
                             "its tokenizer.model or pass lang_tokens / lang_masks")
        task = obs["task"]
        tasks = [task] * state.shape[0] if isinstance(task, str) else list(task)
        if self.cfg.variant == "pi05":  # openpi's prompt: the state's bins, encoded in one piece with the task
            return self.tokenizer(tasks, device=device, states=state[:, : self.cfg.state_dim])
        return self.tokenizer(tasks, device=device)

    def __call__(self, obs: dict[str, Any], device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Run the three steps; returns ``{state, images, image_masks, lang_tokens, lang_masks}`` on ``device``.

        Raises:
            KeyError: ``observation.state`` (or ``task`` without tokens) missing.
            ValueError: widths or image layouts that do not fit the config.
        """
        if STATE_KEY not in obs:
            raise KeyError(f"observation has no {STATE_KEY!r}; keys: {sorted(obs)}")
        state = self.state(obs, device)
        images, image_masks = self.images(obs, state.shape[0], device)
        tokens, tmask = self.language(obs, state, device)
        return {"state": state, "images": images, "image_masks": image_masks, "lang_tokens": tokens,
                "lang_masks": tmask}

    # -- actions ------------------------------------------------------------------------------------------------
    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Env actions ``[..., action_dim]`` -> normalised units."""
        return self.action_stats.normalize(actions, self.norm_mode, self.norm_convention, self.norm_eps)

    def unnormalize_actions(self, x: Tensor) -> Tensor:
        """Normalised ``[..., action_dim]`` -> env actions."""
        return self.action_stats.unnormalize(x, self.norm_mode, self.norm_convention, self.norm_eps)

    # -- persistence --------------------------------------------------------------------------------------------
    def export(self) -> dict[str, Any]:
        """``{"norm_mode", "norm_convention", "norm_eps", "tensors": {observation.state.mean, ..., action.q99},
        "tokenizer_file": path or None, "tokenizer": "sentencepiece" | "byte" | None}`` (lerobot's statistic
        names)."""
        tok = self.tokenizer
        kind = None if tok is None else ("byte" if isinstance(tok, ByteTokenizer) else "sentencepiece")
        return {"norm_mode": self.norm_mode, "norm_convention": self.norm_convention, "norm_eps": self.norm_eps,
                "tensors": {**self.state_stats.tensors(STATE_KEY), **self.action_stats.tensors("action")},
                "tokenizer_file": str(tok.model_file) if kind == "sentencepiece" else None, "tokenizer": kind}

    @classmethod
    def from_export(cls, cfg: Pi0Config, blob: dict[str, Any], root: Path | None = None) -> Pi0Processor:
        """Inverse of :meth:`export`; a relative ``tokenizer_file`` is read under ``root``.

        Raises:
            fastnft.policies.tokenizer.TokenizerError: the tokenizer file is missing or unreadable.
        """
        tok = blob.get("tokenizer_file")
        if tok is not None and root is not None and not Path(tok).is_absolute():
            tok = root / tok
        t = blob["tensors"]
        return cls(cfg, make_tokenizer(blob.get("tokenizer"), tok, cfg.tokenizer_max_length),
                   NormStats.from_tensors(t, STATE_KEY), NormStats.from_tensors(t, "action"), blob["norm_mode"],
                   blob.get("norm_convention", "openpi"), blob.get("norm_eps"))
