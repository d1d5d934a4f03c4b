"""pi0 / pi0.5 checkpoints in the openpi PyTorch / lerobot directory layout; local files only, no network.

Directory::

    model.safetensors                 weights (key map below)
    config.json                       lerobot 0.4.x PI0Config / PI05Config: every field all 0.4 releases read
    fastnft_config.json               fastnft's full Pi0Config (architecture sizes, K, cameras; wins when present)
    tokenizer.model                   PaliGemma's SentencePiece model (optional: without it, pass token ids)
    policy_preprocessor.json, policy_postprocessor.json, policy_*processor_step_*.safetensors
                                      lerobot 0.4.x's processor files: normaliser statistics (observation.state.mean,
                                      action.q99, ...); openpi's assets/<asset_id>/norm_stats.json is read too
    fastnft_processor.json            normalisation mode and formulas, the tokenizer kind and file name
                                      (statistics: :mod:`fastnft.policies.pi0_stats`, docs/pi0_statistics.md)

Key map. fastnft's module tree is openpi's ``PI0Pytorch``, so its state-dict keys ARE openpi's keys:

==========================================================  ==========================================
openpi PyTorch key (= fastnft ``Pi0Model`` key)              what it is
==========================================================  ==========================================
``paligemma_with_expert.paligemma.model.vision_tower.*``     SigLIP (frozen)
``paligemma_with_expert.paligemma.model.multi_modal_projector.linear.*``  image projector (frozen)
``paligemma_with_expert.paligemma.model.language_model.*``   Gemma 2B: ``embed_tokens``, ``layers.{i}.*``, ``norm``
``paligemma_with_expert.gemma_expert.model.layers.{i}.*``    action expert (trained); pi0.5 norms: ``*.dense.*``
``paligemma_with_expert.gemma_expert.model.norm.*``          expert final norm (trained)
``action_in_proj.*``, ``action_out_proj.*``                  action projections (trained)
``state_proj.*``, ``action_time_mlp_{in,out}.*``             pi0 only (trained)
``time_mlp_{in,out}.*``                                      pi0.5 only (trained)
==========================================================  ==========================================

The lerobot layout is the same keys with the prefix ``model.``; loading detects it, saving writes either.
Checkpoints written with ``transformers`` < 4.52 name the PaliGemma parts the old way
(``paligemma.language_model.model.*``, ``paligemma.vision_tower.*``, ``paligemma.multi_modal_projector.*``,
``paligemma.language_model.lm_head.*``); loading renames them to the table above (``LEGACY_RENAMES``).
``paligemma_with_expert.paligemma.lm_head.weight`` is tied to ``embed_tokens`` in ``transformers``: it is not
written and is ignored when present. Unused LM parts of the expert (``gemma_expert.lm_head.*``,
``gemma_expert.model.embed_tokens.*``, present in some ports) are ignored on load. Every other difference is an
error that lists the missing keys, the unexpected keys and each shape mismatch.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fastnft.atomic import atomic_write
from fastnft.config import ConfigError
from fastnft.policies.lerobot_files import lerobot_config
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.pi0_stats import StatisticsError, resolve_processor, write_processor_files

__all__ = ["Checkpoint", "CheckpointError", "check_keys", "load_into", "read_checkpoint", "write_checkpoint"]

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
FULL_CONFIG = "fastnft_config.json"
LEROBOT_PREFIX = "model."
TIED = ("paligemma_with_expert.paligemma.lm_head.weight",)
IGNORED_PREFIXES = ("paligemma_with_expert.gemma_expert.lm_head.", "paligemma_with_expert.gemma_expert.model.embed_tokens.")
_PG = "paligemma_with_expert.paligemma."
LEGACY_RENAMES = ((_PG + "language_model.model.", _PG + "model.language_model."),
                  (_PG + "language_model.lm_head.", _PG + "lm_head."),
                  (_PG + "vision_tower.", _PG + "model.vision_tower."),
                  (_PG + "multi_modal_projector.", _PG + "model.multi_modal_projector."))
# runtime fields a caller may override at load; the rest is architecture and comes from the checkpoint
RUNTIME_FIELDS = ("n_action_steps", "num_steps", "attention", "prefix_mode", "vlm_dtype", "cameras", "action_dim",
                  "state_dim", "normalization", "asset_id")
_LIST_LIMIT = 20


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, unreadable or does not fit the model; the message names the key/file."""


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: the config, the weights (bare openpi keys) and processor data."""

    cfg: Pi0Config
    tensors: dict[str, Tensor]
    processor: dict[str, Any] | None
    layout: str


def write_checkpoint(path: str | Path, state_dict: Mapping[str, Tensor], cfg: Pi0Config, *, layout: str = "lerobot",
                     processor: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (each file atomically).

    Args:
        path: directory, created if needed.
        state_dict: ``Pi0Model.state_dict()`` (bare openpi keys); tied keys are dropped.
        cfg: the model's config.
        layout: ``lerobot`` (``model.`` prefix) or ``openpi`` (bare keys).
        processor: :meth:`Pi0Processor.export` or None; its tokenizer file is copied as ``tokenizer.model``.

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    if layout not in ("lerobot", "openpi"):
        raise ValueError(f"layout must be 'lerobot' or 'openpi', got {layout!r}")
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    pre = LEROBOT_PREFIX if layout == "lerobot" else ""
    tensors = {pre + k: v.detach().cpu().contiguous() for k, v in state_dict.items() if k not in TIED}
    atomic_write(d / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), by_name=True)
    conf = json.dumps(lerobot_config(cfg, processor["norm_mode"] if processor else "identity"), indent=2)
    atomic_write(d / CONFIG, lambda f: f.write(conf), text=True)
    full = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
    atomic_write(d / FULL_CONFIG, lambda f: f.write(full), text=True)
    if processor is not None:
        tok = processor.get("tokenizer_file")
        if tok and Path(tok).resolve() != (d / TOKENIZER).resolve():
            atomic_write(d / TOKENIZER, lambda tmp: shutil.copyfile(tok, tmp), by_name=True)
    write_processor_files(d, cfg, processor, layout)
    return d


def _config_from_json(conf: dict[str, Any], full: dict[str, Any] | None, path: Path,
                      overrides: dict[str, Any]) -> Pi0Config:
    """lerobot / openpi config.json -> :class:`Pi0Config`; fastnft_config.json (``full``) wins when present."""
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"cannot override {bad} at load: they are architecture fields fixed by "
                              f"{path / CONFIG}; overridable: {list(RUNTIME_FIELDS)}")
    if full is not None:
        d = dict(full)
    else:  # a checkpoint written by lerobot / openpi: only the standard sizes exist there
        variant = conf.get("type") or ("pi05" if conf.get("pi05") else "pi0")
        for key, want in (("paligemma_variant", "gemma_2b"), ("action_expert_variant", "gemma_300m")):
            if conf.get(key, want) != want:
                raise CheckpointError(f"{path / CONFIG}: {key}={conf[key]!r} is not supported (only {want!r}); "
                                      f"add {FULL_CONFIG} with the architecture")
        d = {"variant": variant}
        for ours, theirs in (("chunk_size", "chunk_size"), ("chunk_size", "action_horizon"),
                             ("n_action_steps", "n_action_steps"), ("max_state_dim", "max_state_dim"),
                             ("max_action_dim", "max_action_dim"), ("max_action_dim", "action_dim"),
                             ("tokenizer_max_length", "tokenizer_max_length"), ("tokenizer_max_length", "max_token_len"),
                             ("num_steps", "num_steps"), ("num_steps", "num_inference_steps"),
                             ("min_period", "min_period"), ("max_period", "max_period")):
            if theirs in conf:
                d[ours] = conf[theirs]
        feats = conf.get("input_features") or {}
        cams = [k.split(".", 2)[2] for k in feats if k.startswith("observation.images.")]
        if cams:
            d["cameras"] = cams
        if "observation.state" in feats:
            d["state_dim"] = feats["observation.state"]["shape"][-1]
        act = (conf.get("output_features") or {}).get("action")
        if act:
            d["action_dim"] = act["shape"][-1]
        d.setdefault("n_action_steps", d.get("chunk_size", 50))
    d.update(overrides)
    try:
        return Pi0Config.from_dict(d)
    except (ConfigError, TypeError) as e:
        where = path / (FULL_CONFIG if full is not None else CONFIG)
        raise CheckpointError(f"{where} does not describe a valid pi0 config: {e}") from e


def read_checkpoint(path: str | Path, **overrides: Any) -> Checkpoint:
    """Read config, weights and processor data of a checkpoint directory.

    Args:
        path: the directory.
        overrides: runtime fields of :class:`Pi0Config` to replace (see ``RUNTIME_FIELDS``).

    Returns:
        :class:`Checkpoint` with bare openpi keys (the lerobot prefix removed; ignored keys dropped).

    Raises:
        CheckpointError: a file is missing or unreadable, or the config is invalid.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    for f in (WEIGHTS, CONFIG):
        if not (d / f).is_file():
            raise CheckpointError(f"checkpoint directory {str(d)!r} has no {f}; expected the openpi PyTorch / "
                                  f"lerobot layout ({WEIGHTS}, {CONFIG}, {TOKENIZER})")
    try:
        conf = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{d / CONFIG} is not valid JSON ({e})") from e
    full = None
    if (d / FULL_CONFIG).is_file():
        try:
            full = json.loads((d / FULL_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{d / FULL_CONFIG} is not valid JSON ({e})") from e
    cfg = _config_from_json(conf, full, d, overrides)
    try:
        raw = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{d / WEIGHTS} is unreadable or truncated ({type(e).__name__}: {e})") from e
    layout = "lerobot" if raw and all(k.startswith(LEROBOT_PREFIX) for k in raw) else "openpi"
    n = len(LEROBOT_PREFIX) if layout == "lerobot" else 0
    tensors = {}
    for k, v in raw.items():
        k = _rename_legacy(k[n:])
        if k not in TIED and not k.startswith(IGNORED_PREFIXES):
            tensors[k] = v
    try:
        processor = resolve_processor(d, conf, cfg)
    except StatisticsError as e:
        raise CheckpointError(str(e)) from e
    return Checkpoint(cfg, tensors, processor, layout)


def _rename_legacy(key: str) -> str:
    for old, new in LEGACY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _fmt(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def check_keys(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], where: str) -> None:
    """Compare names and shapes; raise one error that lists every difference.

    Raises:
        CheckpointError: with the missing keys, the unexpected keys and ``key: checkpoint shape vs model shape``.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes)}")
        raise CheckpointError(f"checkpoint {where} does not fit the model: " + "; ".join(parts) +
                              ". Check that config.json describes this checkpoint (variant, sizes, max dims).")


def load_into(model: nn.Module, tensors: Mapping[str, Tensor], where: str | Path, check_finite: bool = True) -> None:
    """Copy ``tensors`` into ``model`` after :func:`check_keys` (and a finiteness check), in the model's dtypes.

    Raises:
        CheckpointError: key/shape differences, or a tensor with NaN / inf (named).
    """
    expected = {k: v for k, v in model.state_dict().items() if k not in TIED}
    check_keys(expected, tensors, str(where))
    if check_finite:
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"checkpoint {where}: tensor {k} holds NaN or inf values (corrupted file?)")
    model.load_state_dict(dict(tensors), strict=False)
