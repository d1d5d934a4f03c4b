"""pi0 and pi0.5: a frozen PaliGemma prefix and a trained Gemma-shaped action expert (Black et al. 2024; pi0.5 2025).

Tokens: prefix = [image tokens of each camera, language tokens] (PaliGemma from ``transformers``); suffix =
[state token (pi0 only), H action tokens] (the expert). At layer l the expert's queries attend to
``K, V = cat[prefix K_l, suffix K_l]`` under a block-causal mask (:mod:`fastnft.policies.attention`): the prefix
attends only to itself (bidirectionally), the action tokens to the prefix, the state token and each other.

Because the prefix never attends to the suffix, its keys and values do not depend on ``(x_t, t)``: one policy call
computes them once (:meth:`Pi0Policy.encode` -> :class:`PrefixContext`) and the K denoising steps reuse them
(:meth:`Pi0Policy.velocity`). The context holds per-layer buffers ``[B, Hkv, P + S_suf, hd]`` sized by the config
and the batch: the prefix fills their head once per call, and each denoising step's expert writes its suffix keys /
values into their tail (no concatenation; shapes never depend on the data, so the loop can be CUDA-graph captured:
:mod:`fastnft.loop.graphs`). :meth:`Pi0Model.joint_velocity` is the one-pass reference over ``[prefix, suffix]``.

Flow convention (SPEC): ``t = 1`` noise, ``t = 0`` data, ``x_t = t eps + (1 - t) a``, velocity ``v = eps - a``.
pi0 time: action-time MLP over ``[action_in_proj(x_t), sinusoidal(t)]``. pi0.5 time: adaRMSNorm in the expert
conditioned on ``swish(time_mlp_out(swish(time_mlp_in(sinusoidal(t)))))``.

Module names equal openpi's PyTorch model (``paligemma_with_expert.paligemma.*``, ``...gemma_expert.*``,
``action_in_proj``, ...), so checkpoints map key for key (:mod:`fastnft.policies.pi0_checkpoint`).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from fastnft.policies.attention import (
    BlockLayout,
    VarlenPlan,
    apply_rope,
    attend,
    block_mask,
    resolve_backend,
    varlen_plan,
)
from fastnft.policies.gemma_expert import GemmaExpert, norm_forward
from fastnft.policies.pi0_checkpoint import load_into, read_checkpoint, write_checkpoint
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import Pi0Processor
from fastnft.policies.state_flow import sinusoidal_time_embedding
from fastnft.sde import FlowSDESchedule, SampleRecord, StepFn, sample_actions, split_noise

__all__ = ["FP32_UNDER_BF16", "SUPPORTED_TRANSFORMERS", "Pi0Model", "Pi0Policy", "PrefixContext",
           "check_transformers_version", "paligemma_hf_config"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

SUPPORTED_TRANSFORMERS = (5, 6)
"""``transformers`` major versions ``[5, 6)`` the prefix is built with (pyproject pins the same range). Before 5.0
the PaliGemma module tree differs (``vision_tower.vision_model``; no ``.model`` level before 4.52) and Gemma's
``embed_tokens`` is unscaled; fastnft's numerics no longer depend on the latter (see :meth:`Pi0Model.embed_prefix`)
but its module paths do."""

FP32_UNDER_BF16 = ("embeddings.patch_embedding.", "embeddings.position_embedding.", "input_layernorm.",
                   "post_attention_layernorm.", "language_model.norm.")
"""Prefix parameters kept in float32 when ``vlm_dtype`` is bfloat16, as openpi's PyTorch model keeps them
(``PaliGemmaWithExpertModel.to_bfloat16_for_selected_params``): SigLIP's patch and position embeddings and every
Gemma RMSNorm gain. SigLIP's LayerNorms and all projections are bfloat16 there too."""


def check_transformers_version(version: str | None = None) -> None:
    """Refuse a ``transformers`` outside :data:`SUPPORTED_TRANSFORMERS` (its PaliGemma has other module paths).

    Raises:
        ImportError: naming the installed version and the pip command that installs a supported one.
    """
    version = version or transformers.__version__
    try:
        major = int(version.split(".")[0])
    except ValueError:
        return  # a source build with an odd version string: let it run
    lo, hi = SUPPORTED_TRANSFORMERS
    if not lo <= major < hi:
        raise ImportError(f"pi0 / pi0.5 need transformers>={lo},<{hi}; transformers {version} is installed (its "
                          f"PaliGemma module tree differs). Fix: pip install 'transformers>={lo},<{hi}'")


def paligemma_hf_config(cfg: Pi0Config) -> PaliGemmaConfig:
    """``transformers`` PaliGemma config of the prefix (SigLIP without pooling head, Gemma text model)."""
    v = cfg.vlm
    return PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": v.vision_width,
                       "intermediate_size": v.vision_mlp_dim, "num_hidden_layers": v.vision_depth,
                       "num_attention_heads": v.vision_heads, "image_size": v.image_size,
                       "patch_size": v.patch_size, "vision_use_head": False, "projection_dim": v.width},
        text_config={"model_type": "gemma", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
                     "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads,
                     "num_key_value_heads": v.num_kv_heads, "head_dim": v.head_dim, "vocab_size": v.vocab_size,
                     "rms_norm_eps": v.rms_norm_eps,
                     "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta}},
        projection_dim=v.width, hidden_size=v.width, vocab_size=v.vocab_size, image_token_index=v.vocab_size - 1)


def _room(x: Tensor, suffix_len: int) -> Tensor:
    """``x [B, H, P, hd]`` copied into the head of a new ``[B, H, P + suffix_len, hd]`` buffer (tail uninitialised)."""
    B, H, P, hd = x.shape
    buf = x.new_empty(B, H, P + suffix_len, hd)
    buf[:, :, :P].copy_(x)
    return buf


@dataclass(frozen=True)
class PrefixContext:
    """Per-call prefix cache: the prefix's keys and values at every layer, plus what the suffix needs.

    Static buffers: :meth:`Pi0Model.encode` writes each layer's prefix keys / values into the head of a buffer
    ``[B, Hkv, P + S_suf, head_dim]`` (``kv_buffers``) sized from the config and the batch only, and ``keys`` /
    ``values`` are views of that head. The expert writes its suffix keys / values into the tail at every layer of
    every denoising step (no concatenation into new tensors) and attends over the whole buffer; padding is masked
    by ``valid``, so the shapes never depend on the data and one CUDA graph serves every call of a shape.
    Contexts made by :meth:`index`, :meth:`cat`, :meth:`to` carry no buffers (they are stored, not sampled
    from): :meth:`with_room` adds them (one copy) and :meth:`Pi0Policy.sample` calls it once per call.

    Attributes:
        keys, values: per layer ``[B, Hkv, P, head_dim]`` (RoPE applied to keys), dtype of the prefix.
        valid: ``[B, P]`` bool, False for padded prefix tokens (missing cameras, prompt padding).
        state: ``[B, max_state_dim]`` normalised, padded proprio state (pi0's state token); None for pi0.5.
        kv_buffers: per layer ``(K, V)`` buffers ``[B, Hkv, P + S_suf, head_dim]`` whose heads are ``keys`` /
            ``values``; empty when the context has no room for the suffix.
    """

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    valid: Tensor
    state: Tensor | None
    kv_buffers: tuple[tuple[Tensor, Tensor], ...] = field(default=(), compare=False, repr=False)
    # flash backend: the expert's varlen packing, built on the first velocity call and reused by the K calls
    _plans: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def prefix_len(self) -> int:
        """P."""
        return int(self.valid.shape[1])

    def room(self) -> int:
        """Suffix tokens the buffers hold after the prefix (0 without buffers)."""
        return int(self.kv_buffers[0][0].shape[2]) - self.prefix_len if self.kv_buffers else 0

    def with_room(self, suffix_len: int) -> PrefixContext:
        """This context if its buffers hold ``suffix_len`` suffix tokens, else a copy with such buffers.

        Raises:
            ValueError: buffers of another suffix length (a context built for another config).
        """
        if self.kv_buffers:
            if self.room() != suffix_len:
                raise ValueError(f"prefix context has room for {self.room()} suffix tokens, the expert writes "
                                 f"{suffix_len}: it was encoded for another config")
            return self
        bufs = tuple((_room(k, suffix_len), _room(v, suffix_len)) for k, v in zip(self.keys, self.values, strict=True))
        return PrefixContext(tuple(k[:, :, : self.prefix_len] for k, _ in bufs),
                             tuple(v[:, :, : self.prefix_len] for _, v in bufs), self.valid, self.state, bufs)

    def static_like(self, suffix_len: int) -> PrefixContext:
        """A context of the same shapes (with buffers) whose tensors are new: the static input of a CUDA graph,
        filled per call by :meth:`copy_from`."""
        bufs = tuple((torch.zeros_like(_room(k, suffix_len)), torch.zeros_like(_room(v, suffix_len)))
                     for k, v in zip(self.keys, self.values, strict=True))
        P = self.prefix_len
        return PrefixContext(tuple(k[:, :, :P] for k, _ in bufs), tuple(v[:, :, :P] for _, v in bufs),
                             torch.zeros_like(self.valid), None if self.state is None else torch.zeros_like(self.state),
                             bufs)

    def copy_from(self, other: PrefixContext) -> None:
        """Copy ``other``'s prefix (keys, values, valid, state; same shapes) into this context's tensors in place.

        Raises:
            ValueError: other shapes (a graph captured for another batch or prefix length).
        """
        if other.valid.shape != self.valid.shape or len(other.keys) != len(self.keys):
            raise ValueError(f"prefix context of shape {tuple(other.valid.shape)} x {len(other.keys)} layers copied "
                             f"into one of {tuple(self.valid.shape)} x {len(self.keys)} layers")
        for dst, src in zip((*self.keys, *self.values), (*other.keys, *other.values), strict=True):
            dst.copy_(src)
        self.valid.copy_(other.valid)
        if self.state is not None:
            self.state.copy_(other.state)

    def suffix_plan(self, q_block: Tensor, k_block: Tensor, key_valid: Tensor,
                    layout: BlockLayout | None = None) -> VarlenPlan:
        """The flash packing of ``[prefix, suffix]`` keys for this prefix, built once per context by
        :func:`varlen_plan` (device ops only when ``layout`` is given: no host sync, capturable)."""
        key = (int(q_block.numel()), int(k_block.numel()))
        if key not in self._plans:
            self._plans[key] = varlen_plan(q_block, k_block, key_valid, layout)
        return self._plans[key]

    @property
    def batch_size(self) -> int:
        """B."""
        return int(self.valid.shape[0])

    def index(self, rows: Tensor) -> PrefixContext:
        """Rows ``rows`` (``[M]`` int64 or ``[B]`` bool) of every tensor (cached-prefix micro-batches)."""
        pick = lambda x: None if x is None else x[rows]
        return PrefixContext(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values),
                             self.valid[rows], pick(self.state))  # no buffers: with_room adds them

    def to(self, device: torch.device | str) -> PrefixContext:
        """Copy to ``device`` (a rollout buffer moved between devices)."""
        mv = lambda x: None if x is None else x.to(device)
        return PrefixContext(tuple(k.to(device) for k in self.keys), tuple(v.to(device) for v in self.values),
                             self.valid.to(device), mv(self.state))

    @classmethod
    def cat(cls, parts: list[PrefixContext]) -> PrefixContext:
        """Concatenate along the batch (a rollout buffer of cached prefixes, ``prefix_mode = cached``)."""
        n = len(parts[0].keys)
        return cls(tuple(torch.cat([p.keys[i] for p in parts]) for i in range(n)),
                   tuple(torch.cat([p.values[i] for p in parts]) for i in range(n)),
                   torch.cat([p.valid for p in parts]),
                   None if parts[0].state is None else torch.cat([p.state for p in parts]))

    def nbytes(self) -> int:
        """Bytes held (the memory cost of ``prefix_mode = cached`` per stored call, times B)."""
        ts = [*self.keys, *self.values, self.valid] + ([self.state] if self.state is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


@contextmanager
def _construction(dtype: torch.dtype, init_weights: bool):
    """Build modules directly in ``dtype`` and, when the weights are loaded next, without random initialisation
    (a 2.9B-parameter prefix would otherwise be built and initialised in float32 first: 11.7 GB and minutes)."""
    old = torch.get_default_dtype()
    skip = nullcontext()
    if not init_weights:
        try:
            from transformers.initialization import no_init_weights

            skip = no_init_weights()
        except ImportError:  # older transformers: initialise, only slower
            pass
    torch.set_default_dtype(dtype)
    try:
        with skip:
            yield
    finally:
        torch.set_default_dtype(old)


class _PaliGemmaWithExpert(nn.Module):
    def __init__(self, cfg: Pi0Config, init_weights: bool = True) -> None:
        super().__init__()
        check_transformers_version()
        with _construction(_DTYPES[cfg.vlm_dtype], init_weights):
            self.paligemma = PaliGemmaForConditionalGeneration(paligemma_hf_config(cfg))
        self.paligemma.tie_weights()  # skipped with the initialisation; lm_head shares embed_tokens' weight
        self.gemma_expert = GemmaExpert(cfg.expert, adarms=cfg.variant == "pi05", eps=cfg.vlm.rms_norm_eps)


def _qkv(layer: nn.Module, h: Tensor, cond: Tensor | None, pos: Tensor, theta: float):
    """Pre-norm and projections of one Gemma layer: ``q [B, Hq, S, hd]``, ``k, v [B, Hkv, S, hd]``, residual gate."""
    x, gate = norm_forward(layer.input_layernorm, h, cond)
    a = layer.self_attn
    B, S, _ = x.shape
    hd = a.head_dim
    q = a.q_proj(x).view(B, S, -1, hd).transpose(1, 2)
    k = a.k_proj(x).view(B, S, -1, hd).transpose(1, 2)
    v = a.v_proj(x).view(B, S, -1, hd).transpose(1, 2)
    return apply_rope(q, pos, theta), apply_rope(k, pos, theta), v, gate


def _finish(layer: nn.Module, h: Tensor, attn: Tensor, gate: Tensor | None, cond: Tensor | None) -> Tensor:
    """Output projection, (gated) residual, post-norm MLP, (gated) residual of one Gemma layer."""
    o = layer.self_attn.o_proj(attn.to(h.dtype))
    h = h + (o if gate is None else o * gate)
    x, gate2 = norm_forward(layer.post_attention_layernorm, h, cond)
    m = layer.mlp(x)
    return h + (m if gate2 is None else m * gate2)


class Pi0Model(nn.Module):
    """The pi0 / pi0.5 network (no sampling, no normalisation: see :class:`Pi0Policy`).

    Args:
        cfg: :class:`Pi0Config`. The prefix is built in ``cfg.vlm_dtype`` and frozen; the expert and the projections
            are float32 parameters (autocast selects the compute dtype on a GPU).
        init_weights: False skips the prefix's random initialisation (its weights are loaded next).
    """

    def __init__(self, cfg: Pi0Config, init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        We, D = cfg.expert.width, cfg.max_action_dim
        self.paligemma_with_expert = _PaliGemmaWithExpert(cfg, init_weights)
        self.action_in_proj = nn.Linear(D, We)
        self.action_out_proj = nn.Linear(We, D)
        if cfg.variant == "pi0":
            self.state_proj = nn.Linear(cfg.max_state_dim, We)
            self.action_time_mlp_in = nn.Linear(2 * We, We)
            self.action_time_mlp_out = nn.Linear(We, We)
        else:
            self.time_mlp_in = nn.Linear(We, We)
            self.time_mlp_out = nn.Linear(We, We)
        self.vlm.to(_DTYPES[cfg.vlm_dtype])
        for name, p in self.vlm.named_parameters():
            if any(sel in name for sel in FP32_UNDER_BF16):
                p.data = p.data.float()
        self.vlm.requires_grad_(False)
        self.vlm.eval()
        self._layouts: dict[tuple, BlockLayout] = {}

    def __deepcopy__(self, memo: dict) -> Pi0Model:
        """Copy with the frozen prefix's tensors SHARED: the EMA rollout copy (``fastnft.engine.ema.EMA``) would
        otherwise duplicate 2.9B frozen weights (5.8 GB in bf16) that never change."""
        for t in (*self.vlm.parameters(), *self.vlm.buffers()):
            memo[id(t)] = t
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    @property
    def vlm(self) -> PaliGemmaForConditionalGeneration:
        """The frozen PaliGemma prefix."""
        return self.paligemma_with_expert.paligemma

    @property
    def expert(self) -> GemmaExpert:
        """The trained action expert."""
        return self.paligemma_with_expert.gemma_expert

    def train(self, mode: bool = True) -> Pi0Model:
        """Like ``nn.Module.train`` but the frozen prefix stays in eval mode."""
        super().train(mode)
        self.vlm.eval()
        return self

    def _backend(self, device: torch.device) -> str:
        return resolve_backend(self.cfg.attention, device)

    # -- prefix -------------------------------------------------------------------------------------------------
    def embed_prefix(self, images: Tensor, image_masks: Tensor, lang_tokens: Tensor,
                     lang_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Prefix token embeddings.

        Args:
            images: ``[B, N_cam, 3, S, S]`` float in [-1, 1] (:func:`fastnft.policies.image.siglip_pixels`).
            image_masks: ``[B, N_cam]`` bool, False where a camera is missing.
            lang_tokens: ``[B, L]`` int64 token ids; lang_masks: ``[B, L]`` bool (False = padding).

        Returns:
            ``(emb [B, P, W_vlm] in the prefix dtype, valid [B, P] bool)``, ``P = N_cam * T_img + L``.
        """
        m = self.vlm.model
        B, N = images.shape[:2]
        img = m.multi_modal_projector(self.embed_images(images.reshape(B * N, *images.shape[2:])))
        T = img.shape[1]
        img = img.reshape(B, N * T, -1)
        img_valid = image_masks.bool().repeat_interleave(T, dim=1)
        # Gemma scales token embeddings by sqrt(width). transformers 5.x does it inside embed_tokens (with the scale
        # rounded to the weight dtype), 4.x in GemmaModel.forward, which this path never calls: scale here, from the
        # weight, as openpi does (``lang_emb * math.sqrt(dim)``), so no transformers version changes the prompt.
        w = m.language_model.embed_tokens.weight
        lang = F.embedding(lang_tokens, w) * math.sqrt(w.shape[-1])
        return torch.cat([img, lang.to(img.dtype)], 1), torch.cat([img_valid, lang_masks.bool()], 1)

    def embed_images(self, pixels: Tensor) -> Tensor:
        """SigLIP over ``pixels [M, 3, S, S]`` (float in [-1, 1]) -> ``[M, T_img, W_vision]`` in the prefix dtype.

        As openpi: the patch embedding runs in its weight's dtype (float32 under bfloat16, :data:`FP32_UNDER_BF16`)
        and adds the position embedding there; the sum is cast to the encoder's dtype; post-LayerNorm; no pooling.
        """
        vt = self.vlm.model.vision_tower
        vt = getattr(vt, "vision_model", vt)  # SiglipVisionModel wraps a SiglipVisionTransformer in some versions
        emb = vt.embeddings
        pe = emb.patch_embedding
        x = pe(pixels.to(pe.weight.dtype)).flatten(2).transpose(1, 2)
        x = x + emb.position_embedding.weight[None].to(x.dtype)
        h = vt.encoder(inputs_embeds=x.to(vt.post_layernorm.weight.dtype)).last_hidden_state
        return vt.post_layernorm(h)

    def prefix_cache(self, emb: Tensor, valid: Tensor, state: Tensor | None = None) -> PrefixContext:
        """Run the prefix language model and keep each layer's keys and values.

        Args:
            emb, valid: from :meth:`embed_prefix`.
            state: ``[B, max_state_dim]`` normalised state for pi0's state token (ignored by pi0.5).

        Returns:
            :class:`PrefixContext`. The last layer's attention and MLP are skipped: only its keys and values are
            read by the expert, and they depend on that layer's input alone.
        """
        layers = self.vlm.model.language_model.layers
        theta = self.cfg.vlm.rope_theta
        P = valid.shape[1]
        S = self.cfg.suffix_len
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        lay = self.block_layout("prefix", P, emb.device)
        backend = self._backend(emb.device)
        # once per prefix, device ops only (no host sync)
        plan = varlen_plan(lay.q_block, lay.k_block, valid, lay) if backend != "sdpa" and len(layers) > 1 else None
        mask = block_mask(lay.q_block, lay.k_block, valid) if backend != "flash" else None  # once for all layers
        keys, values, bufs, h = [], [], [], emb
        for li, layer in enumerate(layers):
            q, k, v, _ = _qkv(layer, h, None, pos, theta)
            kb, vb = _room(k, S), _room(v, S)  # static buffers: prefix head now, the expert writes the tail
            bufs.append((kb, vb))
            keys.append(kb[:, :, :P])
            values.append(vb[:, :, :P])
            if li + 1 < len(layers):
                h = _finish(layer, h, attend(q, k, v, lay.q_block, lay.k_block, valid, backend, plan=plan, mask=mask),
                            None, None)
        return PrefixContext(tuple(keys), tuple(values), valid, state if self.cfg.variant == "pi0" else None,
                             tuple(bufs))

    def block_layout(self, part: str, prefix_len: int, device: torch.device) -> BlockLayout:
        """The block ids of the ``prefix`` (queries and keys: all block 0) or ``suffix`` layout (queries: the
        suffix blocks of :meth:`embed_suffix`; keys: ``[0] * P + suffix blocks``), cached per device and ``P``:
        built on the first call (host-to-device copies), then reused, so captured code creates no tensor from host
        data."""
        key = (part, prefix_len, str(device))
        lay = self._layouts.get(key)
        if lay is None:
            suf = self._suffix_block_ids()
            if part == "prefix":
                lay = BlockLayout.build([0] * prefix_len, [0] * prefix_len, device)
            else:
                lay = BlockLayout.build(suf, [0] * prefix_len + suf, device)
            self._layouts[key] = lay
        return lay

    def _suffix_block_ids(self) -> list[int]:
        H = self.cfg.chunk_size
        return [1] + [2] * H if self.cfg.variant == "pi0" else [1] * H

    def encode(self, inputs: dict[str, Tensor]) -> PrefixContext:
        """Processed inputs (:class:`Pi0Processor` output) -> :class:`PrefixContext`. Call under ``no_grad``."""
        emb, valid = self.embed_prefix(inputs["images"], inputs["image_masks"], inputs["lang_tokens"],
                                       inputs["lang_masks"])
        return self.prefix_cache(emb, valid, inputs.get("state"))

    # -- suffix -------------------------------------------------------------------------------------------------
    def embed_suffix(self, state: Tensor | None, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Suffix tokens, their block ids and pi0.5's adaRMS condition.

        Args:
            state: ``[B, max_state_dim]`` (pi0) or None (pi0.5).
            x_t: ``[B, H, D]`` noisy action chunk; t: ``[B]`` flow time in [0, 1].

        Returns:
            ``(emb [B, S_suf, W_exp], blocks [S_suf] int64, cond [B, W_exp] or None)``; blocks: pi0 = [1, 2, .., 2]
            (state token, then the action tokens), pi0.5 = [1, .., 1].
        """
        c = self.cfg
        dt = self.action_in_proj.weight.dtype
        B, H, _ = x_t.shape
        a = self.action_in_proj(x_t.to(dt))
        # float64 as openpi / lerobot: in float32, 2 pi t / p (up to ~1571) is off by ~1e-4 (velocity ~3e-5)
        temb = sinusoidal_time_embedding(t, c.expert.width, c.min_period, c.max_period, torch.float64).to(dt)
        if c.variant == "pi0":
            if state is None:
                raise ValueError("pi0 needs the proprio state for its state token; the context has state=None")
            at = torch.cat([a, temb[:, None].expand(B, H, -1)], -1)
            at = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(at)))
            emb = torch.cat([self.state_proj(state.to(dt))[:, None], at], 1)
            return emb, self.block_layout("suffix", 0, x_t.device).q_block, None
        cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
        return a, self.block_layout("suffix", 0, x_t.device).q_block, cond

    def velocity(self, x_t: Tensor, t: Tensor, ctx: PrefixContext) -> Tensor:
        """Velocity from the cached prefix: ``x_t [B, H, D]``, ``t [B]`` -> ``v [B, H, D]`` float32.

        Without autograd (rollouts) and with buffers of the suffix's dtype (:attr:`PrefixContext.kv_buffers`), each
        layer writes its suffix keys / values into the tail of the context's buffers and attends over the whole
        buffer: no concatenation, no allocation that depends on the data. Otherwise (the update's differentiable
        call, a context without buffers, or an fp32 prefix under bf16 autocast) K, V are concatenated into new
        tensors and the context is only read.
        """
        emb, _, cond = self.embed_suffix(ctx.state, x_t, t)
        B, S, _ = emb.shape
        P = ctx.prefix_len
        n_pre = ctx.valid.long().sum(1, keepdim=True)
        pos = n_pre + torch.arange(S, device=emb.device)[None]
        lay = self.block_layout("suffix", P, emb.device)
        key_valid = torch.cat([ctx.valid, torch.ones(B, S, dtype=torch.bool, device=emb.device)], 1)
        backend = self._backend(emb.device)
        plan = ctx.suffix_plan(lay.q_block, lay.k_block, key_valid, lay) if backend != "sdpa" else None
        mask = block_mask(lay.q_block, lay.k_block, key_valid) if backend != "flash" else None  # once for all layers
        in_place = not torch.is_grad_enabled() and ctx.room() == S
        h = emb
        for li, layer in enumerate(self.expert.model.layers):
            q, k, v, gate = _qkv(layer, h, cond, pos, self.cfg.vlm.rope_theta)
            if in_place and ctx.kv_buffers[li][0].dtype == k.dtype:
                K, V = ctx.kv_buffers[li]
                K[:, :, P:].copy_(k)
                V[:, :, P:].copy_(v)
            else:
                K = torch.cat([ctx.keys[li].to(k.dtype), k], 2)
                V = torch.cat([ctx.values[li].to(v.dtype), v], 2)
            h = _finish(layer, h, attend(q, K, V, lay.q_block, lay.k_block, key_valid, backend, plan=plan, mask=mask),
                        gate, cond)
        h, _ = norm_forward(self.expert.model.norm, h, cond)
        return self.action_out_proj(h[:, -x_t.shape[1]:]).float()

    def joint_velocity(self, inputs: dict[str, Tensor], x_t: Tensor, t: Tensor,
                       return_prefix: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Reference: one forward over ``[prefix, suffix]`` with the joint block mask (no cache).

        Same inputs as :meth:`encode` plus ``x_t [B, H, D]``, ``t [B]``; returns ``v [B, H, D]`` float32, and with
        ``return_prefix`` also the prefix's last hidden states ``[B, P, W_vlm]`` (before the final norm). Tests
        compare it with :meth:`velocity`; it is also the path that would train the prefix (not done here).
        """
        pre, valid = self.embed_prefix(inputs["images"], inputs["image_masks"], inputs["lang_tokens"],
                                       inputs["lang_masks"])
        suf, sblocks, cond = self.embed_suffix(inputs.get("state") if self.cfg.variant == "pi0" else None, x_t, t)
        B, P, S = pre.shape[0], pre.shape[1], suf.shape[1]
        blocks = torch.cat([torch.zeros(P, dtype=torch.long, device=pre.device), sblocks])
        key_valid = torch.cat([valid, torch.ones(B, S, dtype=torch.bool, device=pre.device)], 1)
        pos = (key_valid.long().cumsum(1) - 1).clamp(min=0)
        theta, backend = self.cfg.vlm.rope_theta, self._backend(pre.device)
        plan = varlen_plan(blocks, blocks, key_valid) if backend != "sdpa" else None
        hp, hs = pre, suf
        for lp, le in zip(self.vlm.model.language_model.layers, self.expert.model.layers, strict=True):
            qp, kp, vp, _ = _qkv(lp, hp, None, pos[:, :P], theta)
            qs, ks, vs, gate = _qkv(le, hs, cond, pos[:, P:], theta)
            dt = qs.dtype
            q = torch.cat([qp.to(dt), qs], 2)
            k = torch.cat([kp.to(dt), ks], 2)
            v = torch.cat([vp.to(dt), vs], 2)
            out = attend(q, k, v, blocks, blocks, key_valid, backend, plan=plan)
            hp = _finish(lp, hp, out[:, :P], None, None)
            hs = _finish(le, hs, out[:, P:], gate, cond)
        hs, _ = norm_forward(self.expert.model.norm, hs, cond)
        v = self.action_out_proj(hs[:, -x_t.shape[1]:]).float()
        return (v, hp) if return_prefix else v


class Pi0Policy(nn.Module):
    """pi0 / pi0.5 behind the :class:`fastnft.policies.base.FlowPolicy` protocol.

    Args:
        cfg: :class:`Pi0Config`.
        processor: observation processor (normalisation, tokenizer, images); None = ``obs`` is already processed.

    Shapes: ``obs`` is a dict (raw: see :class:`Pi0Processor`; processed: ``images [B, N_cam, 3, S, S]``,
    ``image_masks [B, N_cam]``, ``lang_tokens/lang_masks [B, L]``, ``state [B, max_state_dim]``); sampler states and
    velocities ``[B, H, D]`` with ``H = cfg.chunk_size``, ``D = cfg.max_action_dim``; flow time ``[B]``.
    """

    def __init__(self, cfg: Pi0Config, processor: Pi0Processor | None = None, init_weights: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Pi0Model(cfg, init_weights)
        self.processor = processor
        self.H, self.n_action_steps, self.D, self.act_dim = (cfg.chunk_size, cfg.n_action_steps,
                                                             cfg.max_action_dim, cfg.action_dim)
        self.compute_dtype = torch.float32

    def set_precision(self, dtype: str | torch.dtype) -> Pi0Policy:
        """Compute precision of the trained expert: ``float32`` or ``bfloat16`` (autocast; its weights stay fp32
        masters). The frozen prefix keeps ``pi0.vlm_dtype``. Velocities are float32 either way.

        Raises:
            ValueError: another dtype.
        """
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dt not in (torch.float32, torch.bfloat16):
            raise ValueError(f"policy precision must be float32 or bfloat16, got {dtype!r}")
        self.compute_dtype = dt
        return self

    @property
    def stores_context(self) -> bool:
        """Rollouts store the per-call :class:`PrefixContext` instead of the raw observation (``prefix_mode:
        cached``): the update then skips the prefix forward, at the memory cost of
        :meth:`Pi0Config.prefix_cache_bytes` per stored call."""
        return self.cfg.prefix_mode == "cached"

    # -- network ------------------------------------------------------------------------------------------------
    def process(self, obs: dict[str, Any]) -> dict[str, Tensor]:
        """Raw observation dict -> model inputs (identity when there is no processor or it is processed)."""
        already = "images" in obs and "lang_tokens" in obs  # processor output keys
        if self.processor is None or already:
            return obs
        return self.processor(obs, device=self.model.action_in_proj.weight.device)

    @torch.no_grad()
    def encode(self, obs: dict[str, Any]) -> PrefixContext:
        """Observation -> prefix cache (no grad: the prefix is frozen). One call per policy call / micro-batch."""
        return self.model.encode(self.process(obs))

    def velocity(self, x_t: Tensor, t: Tensor, ctx: PrefixContext) -> Tensor:
        """``v_theta(x_t, t, ctx)``: ``x_t [B, H, D]``, ``t [B]`` -> ``[B, H, D]`` float32 (differentiable)."""
        if self.compute_dtype == torch.float32:
            return self.model.velocity(x_t, t, ctx)
        with torch.autocast(x_t.device.type, dtype=self.compute_dtype):
            return self.model.velocity(x_t, t, ctx).float()

    def forward(self, x_t: Tensor, t: Tensor, obs: dict[str, Any] | PrefixContext) -> Tensor:
        """The module call the engine wraps. ``obs`` may be a :class:`PrefixContext` (``prefix_mode = cached``);
        otherwise the prefix is recomputed without grad (``recompute``, the default)."""
        ctx = obs if isinstance(obs, PrefixContext) else self.encode(obs)
        return self.velocity(x_t, t, ctx)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The action expert and its projections: exactly what ZeRO shards and the EMA averages (SPEC S9)."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- actions ------------------------------------------------------------------------------------------------
    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Env actions ``[..., action_dim]`` -> normalised, zero-padded ``[..., D]``."""
        a = self.processor.normalize_actions(actions) if self.processor else actions.float()
        return F.pad(a, (0, self.D - a.shape[-1]))

    def to_env_actions(self, x: Tensor) -> Tensor:
        """Normalised sampler output ``[..., D]`` -> env actions ``[..., action_dim]`` (padding dropped)."""
        a = x[..., : self.act_dim].float()
        return self.processor.unnormalize_actions(a) if self.processor else a

    @torch.no_grad()
    def sample(self, obs: dict[str, Any] | PrefixContext, schedule: FlowSDESchedule, *, stochastic: bool,
               generator: torch.Generator | None = None, step_index: Tensor | None = None,
               step_fn: StepFn | None = None, keep_trajectory: bool = False,
               noise: Tensor | None = None) -> SampleRecord:
        """Sample an action chunk per observation with the K-step sampler of :mod:`fastnft.sde` (SPEC S1-S3).

        The prefix is encoded once into static buffers (:class:`PrefixContext`); the K velocity calls write their
        suffix keys / values into the buffers' tail. ``obs`` may be that context already (``prefix_mode = cached``:
        the rollout encodes, stores the context and samples; a context without buffers gets them, one copy).
        Arguments and result as :meth:`fastnft.policies.state_flow.StateFlowPolicy.sample`, plus:

        Args:
            noise: ``[B, K+1, H, D]`` pre-drawn standard normals (per-episode noise): ``noise[:, 0]`` is the initial
                state, ``noise[:, i+1]`` the SDE noise of solver step i; then nothing but a missing ``step_index``
                is drawn from ``generator``.

        Raises:
            ValueError: ``noise`` of another shape or device (:func:`fastnft.sde.split_noise`); as
                :func:`fastnft.sde.sample_actions`.
        """
        ctx = obs if isinstance(obs, PrefixContext) else self.encode(obs)
        # this call's packing is built by its first velocity call (inside a captured graph when graphed), never
        # reused from an earlier call whose valid tokens may differ
        ctx = replace(ctx.with_room(self.cfg.suffix_len), _plans={})
        dev = self.model.action_in_proj.weight.device
        x0, step_noise = split_noise(noise, ctx.batch_size, (self.H, self.D), generator, dev)
        return sample_actions(lambda x, t: self.velocity(x, t, ctx), x0, schedule, stochastic=stochastic,
                              step_index=step_index, generator=generator, step_fn=step_fn,
                              keep_trajectory=keep_trajectory, step_noise=step_noise)

    # -- persistence --------------------------------------------------------------------------------------------
    def save(self, path: str | Path, layout: str = "lerobot") -> Path:
        """Write a checkpoint directory in the openpi PyTorch / lerobot layout (model.safetensors, config.json,
        tokenizer.model, normaliser statistics); see :func:`fastnft.policies.pi0_checkpoint.write_checkpoint`.

        Args:
            path: directory (created; files replaced atomically one by one).
            layout: ``lerobot`` (keys prefixed ``model.``) or ``openpi`` (bare keys).
        """
        return write_checkpoint(path, self.model.state_dict(), self.cfg, layout=layout,
                                processor=self.processor.export() if self.processor else None)

    @classmethod
    def load(cls, path: str | Path, *, device: torch.device | str = "cpu", check_finite: bool = True,
             **cfg_overrides: Any) -> Pi0Policy:
        """Load a checkpoint directory (no network): config, weights, tokenizer and normaliser statistics.

        Args:
            path: directory with ``model.safetensors`` and ``config.json`` (openpi PyTorch or lerobot layout).
            device: where the policy lives.
            check_finite: refuse NaN / inf weights (names the key).
            cfg_overrides: runtime fields of :class:`Pi0Config` to replace (``n_action_steps``, ``attention``,
                ``prefix_mode``, ``num_steps``, ``vlm_dtype``, ``normalization``, ``asset_id``); architecture
                fields come from the checkpoint.

        Raises:
            CheckpointError: missing files, unreadable weights, or keys / shapes that do not fit the config; the
                message lists the missing and unexpected keys and every shape mismatch. Also a checkpoint without
                normalisation statistics (unless ``normalization="identity"``): the message names the files to
                add (:mod:`fastnft.policies.pi0_stats`).
        """
        ck = read_checkpoint(path, **cfg_overrides)
        proc = Pi0Processor.from_export(ck.cfg, ck.processor, Path(path)) if ck.processor else None
        policy = cls(ck.cfg, proc, init_weights=False)
        load_into(policy.model, ck.tensors, path, check_finite=check_finite, layout=ck.layout)
        return policy.to(device)
