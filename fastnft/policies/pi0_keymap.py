"""One key map for pi0 / pi0.5 weights: every layout users have <-> one canonical name per tensor.

Canonical names are openpi's PyTorch module tree (``PI0Pytorch``) as written with the transformers version openpi
pins (4.53): the names lerobot 0.4.x uses after its ``model.`` prefix. Every file layout and fastnft's own module
names (which follow the *installed* transformers) are renamed to them, so the map does not depend on the installed
transformers version:

=====================  ====================================================================  ==================
layout                 what the file names (bare key after the layout prefix)                 detected by
=====================  ====================================================================  ==================
``lerobot``            ``model.`` + canonical (lerobot 0.4.x, transformers >= 4.52 names)    every key ``model.``
``lerobot_legacy``     ``model.`` + transformers < 4.52 names (lerobot 0.3.x):                ``paligemma.language_model.``
                       ``paligemma.language_model.model.*``, ``paligemma.language_model.
                       lm_head``, ``paligemma.vision_tower.*``, ``paligemma.multi_modal_
                       projector.*``
``openpi``             canonical, no prefix (openpi's ``convert_jax_model_to_pytorch.py``)    keys not ``model.``
``transformers``       ``transformers.models.pi0`` ``PI0ForConditionalGeneration``:           ``model.vlm.`` / ``model.dit.``
                       ``model.vlm.*`` (PaliGemmaModel), ``model.dit.*`` (the expert),        / ``embed_action_time.``
                       ``embed_action_time.{action_in_proj,state_proj,action_time_mlp_*}``;
                       its ``save_pretrained`` writes openpi names with ``language_model.
                       model.*`` and no ``vision_model``, also accepted
=====================  ====================================================================  ==================

Renames applied to every bare key (in this order; each is idempotent on canonical names):

- transformers' PI0: ``model.vlm.`` -> ``paligemma_with_expert.paligemma.model.``, ``model.dit.embed_tokens.`` ->
  ``paligemma_with_expert.gemma_expert.lm_head.`` (both are the expert's unused ``[vocab, W_expert]`` matrix;
  transformers' own conversion maps one to the other), ``model.dit.`` -> ``...gemma_expert.model.``,
  ``embed_action_time.`` -> nothing;
- transformers < 4.52 (``LEGACY_RENAMES``);
- transformers 5 ``save_pretrained``: ``...paligemma.model.language_model.model.`` -> ``...language_model.``;
- SigLIP under transformers 5 has no ``vision_model`` level: ``...vision_tower.X`` -> ``...vision_tower.vision_model.X``
  for SigLIP's children X (``embeddings``, ``encoder``, ``post_layernorm``, ``head``); other names pass unchanged.

Tied group: ``...paligemma.lm_head.weight`` and ``...paligemma.model.language_model.embed_tokens.weight`` are one
matrix. ``safetensors.torch.save_model`` (lerobot, openpi) keeps only the alphabetically first name, ``lm_head``;
loading takes the embedding from whichever name the file holds (``embed_tokens`` when both are there).
Unused: the expert's ``lm_head`` / ``embed_tokens`` (openpi builds the expert as a causal LM; pi0 never reads them)
are dropped on load and written as zeros on save, so that strict loaders find every key they own.

Variant: pi0.5 has adaRMS ``...gemma_expert.model.layers.N.{input,post_attention}_layernorm.dense.*`` and
``time_mlp_{in,out}``; pi0 has plain norm weights, ``action_time_mlp_{in,out}`` and ``state_proj``
(:func:`detect_variant`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["LAYOUTS", "SAVE_LAYOUTS", "canonical", "detect_layout", "detect_variant", "from_canonical",
           "group_keys", "model_expected", "to_canonical"]

T = TypeVar("T")

LAYOUTS = ("lerobot", "lerobot_legacy", "openpi", "transformers")
SAVE_LAYOUTS = ("lerobot", "openpi", "transformers")
LEROBOT_PREFIX = "model."
PWE = "paligemma_with_expert."
PG = PWE + "paligemma."
EXPERT = PWE + "gemma_expert."
EMBED = PG + "model.language_model.embed_tokens.weight"
LM_HEAD = PG + "lm_head.weight"
TIED_GROUPS = ((LM_HEAD, EMBED),)
"""Canonical tied groups: (name ``save_model`` keeps, name fastnft's modules read)."""
EXPERT_LM_HEAD = EXPERT + "lm_head.weight"
UNUSED_PREFIXES = (EXPERT + "lm_head.", EXPERT + "model.embed_tokens.")
"""The expert's LM parts: present in openpi / lerobot / transformers files, never read by pi0's computation."""
STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
"""lerobot 0.3.x keeps its normalisation statistics as buffers in ``model.safetensors``, outside ``model.``;
:mod:`fastnft.policies.pi0_stats` reads them from the file, so they are not weights."""
LEGACY_RENAMES = ((PG + "language_model.model.", PG + "model.language_model."),
                  (PG + "language_model.lm_head.", PG + "lm_head."),
                  (PG + "vision_tower.", PG + "model.vision_tower."),
                  (PG + "multi_modal_projector.", PG + "model.multi_modal_projector."))
_TF_RENAMES = (("model.vlm.", PG + "model."), ("model.dit.embed_tokens.", EXPERT + "lm_head."),
               ("model.dit.", EXPERT + "model."), ("embed_action_time.", ""))
_TF_MARKERS = ("model.vlm.", "model.dit.", "embed_action_time.")
_VISION = PG + "model.vision_tower."
_SIGLIP_CHILDREN = tuple(_VISION + c for c in ("embeddings.", "encoder.", "post_layernorm.", "head."))
_PROJ_IN_TIME_EMBED = ("action_in_proj.", "state_proj.", "action_time_mlp_in.", "action_time_mlp_out.")
_ADARMS = re.compile(r"gemma_expert\.model\.(layers\.\d+\.(input|post_attention)_layernorm|norm)\.dense\.")
_PI05_ONLY = ("time_mlp_in.", "time_mlp_out.")
_PI0_ONLY = ("action_time_mlp_in.", "action_time_mlp_out.", "state_proj.")


def canonical(key: str) -> str:
    """Bare key of any known layout (or fastnft's own module name) -> canonical name; unknown keys pass through."""
    for old, new in _TF_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    for old, new in LEGACY_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    double = PG + "model.language_model.model."
    if key.startswith(double):
        key = PG + "model.language_model." + key[len(double):]
    if key.startswith(_SIGLIP_CHILDREN):
        key = _VISION + "vision_model." + key[len(_VISION):]
    return key


def detect_layout(keys: Iterable[str]) -> str:
    """The layout of a file's key set (one of :data:`LAYOUTS`); see the module table."""
    keys = list(keys)
    if any(k.startswith(_TF_MARKERS) for k in keys):
        return "transformers"
    if keys and all(k.startswith(LEROBOT_PREFIX) for k in keys):
        bare = [k[len(LEROBOT_PREFIX):] for k in keys]
        return "lerobot_legacy" if any(k.startswith(PG + "language_model.") for k in bare) else "lerobot"
    return "openpi"


def detect_variant(keys: Iterable[str]) -> str | None:
    """``pi0`` / ``pi05`` from canonical (or any layout's) key names; None when the keys say neither or both."""
    names = [canonical(k[len(LEROBOT_PREFIX):] if k.startswith(LEROBOT_PREFIX) and not k.startswith(_TF_MARKERS)
                       else k) for k in keys]
    pi05 = any(_ADARMS.search(k) or k.startswith(_PI05_ONLY) for k in names)
    pi0 = any(k.startswith(_PI0_ONLY) for k in names)
    if pi05 == pi0:
        return None
    return "pi05" if pi05 else "pi0"


def to_canonical(raw: Mapping[str, T], layout: str | None = None) -> tuple[dict[str, T], str]:
    """A file's tensors (or shapes) -> canonical names, tied group resolved, unused expert LM parts dropped.

    Args:
        raw: file key -> tensor (or any value, e.g. a shape).
        layout: one of :data:`LAYOUTS`; None detects it (:func:`detect_layout`).

    Returns:
        ``(canonical name -> value, layout)``. The embedding is taken from ``lm_head`` when the file holds no
        ``embed_tokens``; ``lm_head`` is never returned (fastnft ties it to the embedding).

    Raises:
        ValueError: two file keys map to the same canonical name (a file mixing layouts).
    """
    raw = {k: v for k, v in raw.items() if not k.startswith(STATS_PREFIXES)}
    layout = layout or detect_layout(raw)
    strip = len(LEROBOT_PREFIX) if layout in ("lerobot", "lerobot_legacy") else 0
    out: dict[str, T] = {}
    origin: dict[str, str] = {}
    for k, v in raw.items():
        c = canonical(k[strip:])
        if c in out:
            raise ValueError(f"file keys {origin[c]!r} and {k!r} are both {c!r}: the file mixes two layouts")
        out[c], origin[c] = v, k
    for keep, alias in TIED_GROUPS:
        if keep in out:
            val = out.pop(keep)
            out.setdefault(alias, val)
    return {k: v for k, v in out.items() if not k.startswith(UNUSED_PREFIXES)}, layout


def model_expected(state_dict: Mapping[str, T]) -> dict[str, tuple[str, T]]:
    """fastnft's ``Pi0Model.state_dict()`` -> ``{canonical name: (module key, value)}`` without the tied alias.

    fastnft builds SigLIP / Gemma from the installed transformers, whose names vary with its version; the same
    :func:`canonical` renames make them version-independent.
    """
    out: dict[str, tuple[str, T]] = {}
    for k, v in state_dict.items():
        c = canonical(k)
        if c == LM_HEAD or c.startswith(UNUSED_PREFIXES):
            continue
        out[c] = (k, v)
    return out


def _to_transformers(c: str) -> str:
    if c.startswith(_VISION + "vision_model."):
        return "model.vlm.vision_tower." + c[len(_VISION + "vision_model."):]
    if c.startswith(PG + "model."):
        return "model.vlm." + c[len(PG + "model."):]
    if c == EXPERT_LM_HEAD:
        return "model.dit.embed_tokens.weight"
    if c.startswith(EXPERT + "model."):
        return "model.dit." + c[len(EXPERT + "model."):]
    if c.startswith(_PROJ_IN_TIME_EMBED):
        return "embed_action_time." + c
    return c


def from_canonical(tensors: Mapping[str, Tensor], layout: str, *, vocab_size: int, expert_width: int,
                   variant: str) -> dict[str, Tensor]:
    """Canonical tensors (:func:`model_expected` names) -> the file keys of ``layout`` (one of :data:`SAVE_LAYOUTS`).

    - ``lerobot``: ``model.`` + canonical; both names of the tied group (lerobot 0.4.x loads with
      ``load_state_dict(strict=True)``, which misses ``embed_tokens`` in its own single-name files), and the
      expert's ``lm_head`` as zeros (a key of lerobot's module tree, unused).
    - ``openpi``: canonical; ``lm_head`` only for the tied group, as ``safetensors.torch.save_model`` writes and
      ``load_model`` (openpi's loader) expects; the expert's ``lm_head`` as zeros.
    - ``transformers``: ``PI0ForConditionalGeneration``'s module names; its unused ``model.dit.embed_tokens`` as
      zeros. pi0 only: transformers has no pi0.5.

    Raises:
        ValueError: unknown layout, pi0.5 in the transformers layout, or no embedding in ``tensors``.
    """
    if layout not in SAVE_LAYOUTS:
        raise ValueError(f"layout must be one of {SAVE_LAYOUTS}, got {layout!r}")
    if layout == "transformers" and variant != "pi0":
        raise ValueError("transformers.models.pi0 implements pi0 only; save a pi0.5 policy with layout 'lerobot' "
                         "or 'openpi'")
    if EMBED not in tensors:
        raise ValueError(f"the tensors hold no {EMBED}: pass a Pi0Model's state dict")
    emb = tensors[EMBED]
    out = dict(tensors)
    out[EXPERT_LM_HEAD] = torch.zeros(vocab_size, expert_width, dtype=emb.dtype, device=emb.device)
    if layout == "transformers":
        return {_to_transformers(k): v for k, v in out.items()}
    out[LM_HEAD] = emb
    if layout == "openpi":
        del out[EMBED]
        return out
    out[LM_HEAD] = emb.clone()  # a separate copy: safetensors refuses two names for one storage
    return {LEROBOT_PREFIX + k: v for k, v in out.items()}


def group_keys(keys: Iterable[str], max_groups: int = 8, min_depth: int = 4) -> list[tuple[str, int]]:
    """Group keys by their longest shared dotted prefix: ``[(prefix + ".*" or the key itself, count)]``, largest
    first.

    Keys that all share a prefix of at least ``min_depth`` segments are one group (437 SigLIP keys read as one
    line); otherwise they split at the first segment where they diverge (437 SigLIP keys + 1 embedding: two
    groups). At most ``max_groups`` groups; the rest are summed into a last ``("other keys", n)``.
    """
    keys = sorted(set(keys))
    if not keys:
        return []
    parts = [k.split(".") for k in keys]
    depth = 1
    longest = max(len(p) for p in parts)
    while depth < longest and len({tuple(p[:depth]) for p in parts}) == 1:
        depth += 1
    if len(keys) > 1 and depth - 1 >= min_depth:  # one shared deep prefix: one group
        depth -= 1
    groups: dict[tuple[str, ...], list[list[str]]] = {}
    for p in parts:
        groups.setdefault(tuple(p[:depth]), []).append(p)
    out = []
    for members in groups.values():
        if len(members) == 1:
            out.append((".".join(members[0]), 1))
            continue
        common = []
        for segs in zip(*members, strict=False):
            if len(set(segs)) > 1:
                break
            common.append(segs[0])
        out.append((".".join(common) + ".*", len(members)))
    out.sort(key=lambda g: (-g[1], g[0]))
    if len(out) > max_groups:
        rest = sum(n for _, n in out[max_groups - 1:])
        out = out[: max_groups - 1] + [("other keys", rest)]
    return out
