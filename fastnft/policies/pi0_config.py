"""Configuration of the pi0 / pi0.5 policies: PaliGemma prefix (frozen) + Gemma-shaped action expert (trained).

Sizes follow openpi's variants: the prefix is PaliGemma (SigLIP So400m/14 at 224 px + Gemma 2B), the action expert
is "gemma_300m" (width 1024, depth 18, MLP 4096, 8 heads, 1 KV head, head dim 256). The expert attends layer by
layer to the prefix's keys and values, so its depth, KV heads and head dim must equal the prefix language model's.

    cfg = Pi0Config.pi0()            # full size (pi0)
    cfg = Pi0Config.tiny("pi05")     # a few-thousand-parameter model for CPU tests

Every field is validated in ``__post_init__``; an invalid value raises :class:`fastnft.config.ConfigError` that names
the key (``pi0.<field>``) and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from fastnft.config import ConfigError

__all__ = ["ExpertConfig", "Pi0Config", "VLMConfig"]


def _require(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key 'pi0.{key}': {msg}")


@dataclass(kw_only=True)
class VLMConfig:
    """The frozen PaliGemma prefix: SigLIP vision tower + linear projector + Gemma language model."""

    image_size: int = 224
    """Square input resolution of SigLIP in pixels (images are resized with padding to it)."""
    patch_size: int = 14
    """SigLIP patch size in pixels; one camera gives ``(image_size / patch_size)^2`` prefix tokens (256 at 224)."""
    vision_width: int = 1152
    """SigLIP hidden size."""
    vision_depth: int = 27
    """SigLIP transformer layers."""
    vision_mlp_dim: int = 4304
    """SigLIP MLP hidden size."""
    vision_heads: int = 16
    """SigLIP attention heads."""
    width: int = 2048
    """Gemma hidden size (also the projector's output width)."""
    depth: int = 18
    """Gemma layers; the action expert has the same depth."""
    mlp_dim: int = 16384
    """Gemma MLP hidden size."""
    num_heads: int = 8
    """Gemma query heads."""
    num_kv_heads: int = 1
    """Gemma key/value heads (multi-query attention in Gemma 2B)."""
    head_dim: int = 256
    """Gemma head dim."""
    vocab_size: int = 257152
    """Token vocabulary of PaliGemma's SentencePiece tokenizer (256000 text + 1024 loc + 128 seg tokens)."""
    rms_norm_eps: float = 1e-6
    """Epsilon of Gemma's RMSNorm."""
    rope_theta: float = 10000.0
    """RoPE base of Gemma (shared by the expert: both use the same positions)."""

    def __post_init__(self) -> None:
        _require(self.image_size % self.patch_size == 0, "vlm.image_size",
                 f"must be a multiple of vlm.patch_size={self.patch_size}")
        _require(self.vision_width % self.vision_heads == 0, "vlm.vision_heads",
                 f"must divide vlm.vision_width={self.vision_width}")
        _require(self.num_heads % self.num_kv_heads == 0, "vlm.num_kv_heads",
                 f"must divide vlm.num_heads={self.num_heads}")
        for k in ("width", "depth", "mlp_dim", "head_dim", "vocab_size", "vision_depth", "vision_mlp_dim"):
            _require(getattr(self, k) >= 1, f"vlm.{k}", "must be >= 1")

    @property
    def tokens_per_image(self) -> int:
        """Prefix tokens of one camera image."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(kw_only=True)
class ExpertConfig:
    """The Gemma-shaped action expert (openpi's ``gemma_300m``): the only part that trains."""

    width: int = 1024
    """Hidden size of the expert's tokens."""
    depth: int = 18
    """Layers; must equal ``vlm.depth`` (layer l attends to the prefix's layer-l keys and values)."""
    mlp_dim: int = 4096
    """Gated-GELU MLP hidden size."""
    num_heads: int = 8
    """Query heads."""
    num_kv_heads: int = 1
    """Key/value heads; must equal ``vlm.num_kv_heads`` (keys and values are concatenated with the prefix's)."""
    head_dim: int = 256
    """Head dim; must equal ``vlm.head_dim``."""

    def __post_init__(self) -> None:
        for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
            _require(getattr(self, k) >= 1, f"expert.{k}", "must be >= 1")
        _require(self.num_heads % self.num_kv_heads == 0, "expert.num_kv_heads",
                 f"must divide expert.num_heads={self.num_heads}")
        _require(self.width % 2 == 0, "expert.width", "must be even (sine-cosine time embedding)")


@dataclass(kw_only=True)
class Pi0Config:
    """pi0 / pi0.5 policy: architecture, action chunking and runtime options."""

    variant: Literal["pi0", "pi05"] = "pi0"
    """``pi0``: state token + action-time MLP; ``pi05``: no state token, flow time through adaRMSNorm."""
    chunk_size: int = 50
    """Action horizon H: action tokens predicted per policy call (lerobot's ``chunk_size``)."""
    n_action_steps: int = 50
    """Executed steps C <= H per policy call (supervised by StepNFT)."""
    max_action_dim: int = 32
    """Padded action dim D: env actions are zero-padded to it (openpi: 32)."""
    max_state_dim: int = 32
    """Padded proprio-state width (openpi: 32)."""
    action_dim: int = 7
    """The env's action width (<= max_action_dim); ``to_env_actions`` keeps the first ``action_dim`` entries."""
    state_dim: int = 8
    """The env's proprio-state width (<= max_state_dim)."""
    cameras: tuple[str, ...] = ("base_0_rgb",)
    """Camera names in prefix order; each adds ``vlm.tokens_per_image`` prefix tokens."""
    tokenizer_max_length: int = 48
    """Language tokens in the prefix (openpi: 48 for pi0, 200 for pi0.5, whose prompt also holds the state)."""
    num_steps: int = 10
    """Denoising steps K of the sampler (SPEC S1); StepNFT uses fewer (paper: 4)."""
    min_period: float = 4e-3
    """Shortest period of the sinusoidal flow-time embedding."""
    max_period: float = 4.0
    """Longest period of the sinusoidal flow-time embedding."""
    normalization: Literal["auto", "mean_std", "quantile", "identity"] = "auto"
    """State / action normalisation of a loaded checkpoint. ``auto``: the mode its files name (lerobot's
    ``normalization_mapping``, fastnft_processor.json), else the variant's (pi0 ``mean_std``, pi0.5 ``quantile``),
    with statistics from its lerobot processor files or openpi ``assets/<asset_id>/norm_stats.json``; a checkpoint
    without statistics is refused. ``mean_std`` / ``quantile`` force that mode (the statistics must hold it).
    ``identity``: no normalisation, the only way to load a checkpoint without statistics (a pretrained policy then
    sees unnormalised state and acts in normalised units). See docs/pi0_statistics.md."""
    asset_id: str | None = None
    """openpi asset id whose ``assets/<asset_id>/norm_stats.json`` holds the statistics (e.g. ``trossen``,
    ``physical-intelligence/libero``); needed only when the checkpoint has several. Saving in the openpi layout
    writes ``assets/<asset_id or "fastnft">/norm_stats.json``."""
    vlm_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage and compute dtype of the frozen prefix (tests use float32 for exact comparisons)."""
    attention: Literal["auto", "sdpa", "flash"] = "auto"
    """Attention backend: ``sdpa`` (PyTorch, default on CPU), ``flash`` (flash-attn, ``gpu`` extra + CUDA), or
    ``auto`` = flash when both are available, else sdpa."""
    prefix_mode: Literal["recompute", "cached"] = "recompute"
    """Update-time prefix: ``recompute`` runs the frozen prefix again (no grad) per micro-batch; ``cached`` reuses
    the prefix keys/values stored at rollout. Cost of ``cached``: ``2 * vlm.depth * vlm.num_kv_heads * P *
    vlm.head_dim`` values per policy call (P = prefix tokens); see :meth:`prefix_cache_bytes`."""
    vlm: VLMConfig = field(default_factory=VLMConfig)
    """The frozen PaliGemma prefix."""
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    """The trained action expert."""

    def __post_init__(self) -> None:
        if isinstance(self.vlm, dict):
            self.vlm = VLMConfig(**self.vlm)
        if isinstance(self.expert, dict):
            self.expert = ExpertConfig(**self.expert)
        self.cameras = tuple(self.cameras)
        _require(self.variant in ("pi0", "pi05"), "variant", f"must be 'pi0' or 'pi05', got {self.variant!r}")
        _require(self.chunk_size >= 1, "chunk_size", "must be >= 1")
        _require(1 <= self.n_action_steps <= self.chunk_size, "n_action_steps",
                 f"must be in [1, chunk_size={self.chunk_size}]")
        _require(1 <= self.action_dim <= self.max_action_dim, "action_dim",
                 f"must be in [1, max_action_dim={self.max_action_dim}]; raise max_action_dim for wider robots")
        _require(1 <= self.state_dim <= self.max_state_dim, "state_dim",
                 f"must be in [1, max_state_dim={self.max_state_dim}]")
        _require(len(self.cameras) >= 1, "cameras", "list at least one camera name")
        _require(len(set(self.cameras)) == len(self.cameras), "cameras", "camera names must be unique")
        _require(self.tokenizer_max_length >= 1, "tokenizer_max_length", "must be >= 1")
        _require(self.num_steps >= 1, "num_steps", "must be >= 1")
        _require(0 < self.min_period < self.max_period, "min_period", "need 0 < min_period < max_period")
        _require(self.normalization in ("auto", "mean_std", "quantile", "identity"), "normalization",
                 f"must be auto, mean_std, quantile or identity, got {self.normalization!r}")
        _require(self.asset_id is None or (isinstance(self.asset_id, str) and self.asset_id.strip("/") != ""
                                           and ".." not in self.asset_id.split("/")), "asset_id",
                 f"must be an openpi asset id such as 'trossen' (a folder under assets/), got {self.asset_id!r}")
        e, v = self.expert, self.vlm
        _require(e.depth == v.depth, "expert.depth",
                 f"must equal vlm.depth={v.depth}: expert layer l attends to the prefix's layer-l keys/values")
        _require(e.num_kv_heads == v.num_kv_heads, "expert.num_kv_heads",
                 f"must equal vlm.num_kv_heads={v.num_kv_heads}: keys/values are concatenated with the prefix's")
        _require(e.head_dim == v.head_dim, "expert.head_dim", f"must equal vlm.head_dim={v.head_dim}")

    # -- presets ------------------------------------------------------------------------------------------------
    @classmethod
    def pi0(cls, **kw: Any) -> Pi0Config:
        """Full-size pi0 (PaliGemma 3B prefix, gemma_300m expert, H = 50, D = 32)."""
        return cls(variant="pi0", **kw)

    @classmethod
    def pi05(cls, **kw: Any) -> Pi0Config:
        """Full-size pi0.5 (same sizes; state in the prompt, adaRMSNorm time conditioning, 200 prompt tokens)."""
        kw.setdefault("tokenizer_max_length", 200)
        return cls(variant="pi05", **kw)

    @classmethod
    def tiny(cls, variant: Literal["pi0", "pi05"] = "pi0", **kw: Any) -> Pi0Config:
        """A tiny model with the same structure (2 layers, head dim 8, 16-px images) for CPU tests."""
        base: dict[str, Any] = {
            "variant": variant, "chunk_size": 6, "n_action_steps": 4, "max_action_dim": 8, "max_state_dim": 6,
            "action_dim": 4, "state_dim": 5, "cameras": ("base_0_rgb", "wrist_0_rgb"), "tokenizer_max_length": 7,
            "num_steps": 4, "vlm_dtype": "float32", "attention": "sdpa",
            "vlm": VLMConfig(image_size=16, patch_size=8, vision_width=16, vision_depth=1, vision_mlp_dim=24,
                             vision_heads=2, width=24, depth=2, mlp_dim=40, num_heads=4, num_kv_heads=1,
                             head_dim=8, vocab_size=128),
            "expert": ExpertConfig(width=16, depth=2, mlp_dim=32, num_heads=4, num_kv_heads=1, head_dim=8),
        }
        base.update(kw)
        return cls(**base)

    # -- derived sizes ------------------------------------------------------------------------------------------
    @property
    def prefix_len(self) -> int:
        """Prefix tokens P: image tokens of every camera + language tokens."""
        return len(self.cameras) * self.vlm.tokens_per_image + self.tokenizer_max_length

    @property
    def suffix_len(self) -> int:
        """Suffix tokens: [state token (pi0 only), H action tokens]."""
        return self.chunk_size + (1 if self.variant == "pi0" else 0)

    def prefix_cache_bytes(self, bytes_per_value: int = 2) -> int:
        """Bytes of one policy call's prefix keys and values (``prefix_mode = cached`` stores this per row)."""
        v = self.vlm
        return 2 * v.depth * v.num_kv_heads * self.prefix_len * v.head_dim * bytes_per_value

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["cameras"] = list(self.cameras)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pi0Config:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError` naming them.

        Raises:
            ConfigError: unknown key or invalid value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ConfigError(f"config keys {['pi0.' + k for k in extra]} are unknown; known keys: {sorted(known)}")
        d = dict(d)
        for sub, sub_cls in (("vlm", VLMConfig), ("expert", ExpertConfig)):
            if isinstance(d.get(sub), dict):
                sub_known = {f.name for f in dataclasses.fields(sub_cls)}
                bad = sorted(set(d[sub]) - sub_known)
                if bad:
                    raise ConfigError(f"config keys {[f'pi0.{sub}.{k}' for k in bad]} are unknown")
                d[sub] = sub_cls(**d[sub])
        return cls(**d)
