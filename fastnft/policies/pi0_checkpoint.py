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

Key names: :mod:`fastnft.policies.pi0_keymap` maps every layout users have (lerobot 0.4.x, lerobot 0.3.x, openpi
PyTorch, transformers' ``PI0ForConditionalGeneration``) and fastnft's own module names to one canonical name per
tensor, independent of the installed transformers. Loading detects the layout from the key names and the variant
(pi0 / pi0.5) from the weights when config.json does not say it; saving writes ``lerobot`` (default), ``openpi`` or
``transformers`` (pi0 only: config.json is then transformers' ``PI0Config``). A key mismatch is one error that
groups the missing and unexpected keys by prefix, lists each shape mismatch and names the likely cause.
See docs/pi0_checkpoints.md.
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
from fastnft.policies import pi0_hf_config as hf
from fastnft.policies import pi0_keymap as km
from fastnft.policies.lerobot_files import lerobot_config
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.pi0_stats import StatisticsError, read_json, resolve_processor, write_processor_files

__all__ = ["Checkpoint", "CheckpointError", "check_keys", "load_into", "read_checkpoint", "write_checkpoint"]

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
FULL_CONFIG = "fastnft_config.json"
# runtime fields a caller may override at load; the rest is architecture and comes from the checkpoint
RUNTIME_FIELDS = ("n_action_steps", "num_steps", "attention", "prefix_mode", "vlm_dtype", "cameras", "action_dim",
                  "state_dim", "normalization", "asset_id")
_LIST_LIMIT = 20


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete, unreadable or does not fit the model; the message names the key/file."""


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found: the config, the weights (canonical names, :mod:`pi0_keymap`), processor
    data and the file's layout (one of ``pi0_keymap.LAYOUTS``)."""

    cfg: Pi0Config
    tensors: dict[str, Tensor]
    processor: dict[str, Any] | None
    layout: str


def write_checkpoint(path: str | Path, state_dict: Mapping[str, Tensor], cfg: Pi0Config, *, layout: str = "lerobot",
                     processor: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory (each file atomically).

    Args:
        path: directory, created if needed.
        state_dict: ``Pi0Model.state_dict()`` (fastnft's module names, any transformers version).
        cfg: the model's config.
        layout: ``lerobot`` (what lerobot 0.4.x loads strictly: ``model.`` prefix, ``vision_tower.vision_model.*``,
            ``lm_head``), ``openpi`` (bare keys, one name per tied group) or ``transformers``
            (``PI0ForConditionalGeneration.from_pretrained``; pi0 only); see :func:`pi0_keymap.from_canonical`.
        processor: :meth:`Pi0Processor.export` or None; its tokenizer file is copied as ``tokenizer.model``.

    Returns:
        The directory.

    Raises:
        ValueError: an unknown layout, or ``transformers`` for a pi0.5 config.
    """
    from safetensors.torch import save_file

    canon = {c: v.detach().cpu().contiguous() for c, (_, v) in km.model_expected(state_dict).items()}
    tensors = km.from_canonical(canon, layout, vocab_size=cfg.vlm.vocab_size, expert_width=cfg.expert.width,
                                variant=cfg.variant)
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), by_name=True)
    conf = json.dumps(hf.to_transformers_config(cfg) if layout == "transformers" else
                      lerobot_config(cfg, processor["norm_mode"] if processor else "identity"), indent=2)
    atomic_write(d / CONFIG, lambda f: f.write(conf), text=True)
    full = json.dumps(cfg.to_dict(), indent=2, sort_keys=True)
    atomic_write(d / FULL_CONFIG, lambda f: f.write(full), text=True)
    if processor is not None:
        tok = processor.get("tokenizer_file")
        if tok and Path(tok).resolve() != (d / TOKENIZER).resolve():
            atomic_write(d / TOKENIZER, lambda tmp: shutil.copyfile(tok, tmp), by_name=True)
    write_processor_files(d, cfg, processor, layout)
    return d


def _variant(said: str | None, weights: str | None, where: Path) -> str:
    """The variant config.json names, checked against the weights; the weights' when the config names none
    (openpi's converter writes no variant field)."""
    if said is not None and weights is not None and said != weights:
        raise CheckpointError(f"{where} says variant {said!r} but the weights are {weights!r} (pi0.5: adaRMS "
                              f"'...layernorm.dense.*' and 'time_mlp_*'; pi0: 'action_time_mlp_*', 'state_proj'): "
                              f"set the variant in {where.name} to {weights!r}")
    if said is None and weights is None:
        raise CheckpointError(f"{where} names no variant and the weights tell neither pi0 nor pi0.5: add "
                              f'"type": "pi0" or "type": "pi05" to {where.name}')
    return said or weights


def _config_from_json(conf: dict[str, Any], full: dict[str, Any] | None, path: Path,
                      overrides: dict[str, Any], weights_variant: str | None = None) -> Pi0Config:
    """lerobot / openpi / transformers config.json -> :class:`Pi0Config`; fastnft_config.json (``full``) wins when
    present. ``weights_variant``: :func:`pi0_keymap.detect_variant` of the weights (checked against the config)."""
    bad = sorted(set(overrides) - set(RUNTIME_FIELDS))
    if bad:
        raise CheckpointError(f"cannot override {bad} at load: they are architecture fields fixed by "
                              f"{path / CONFIG}; overridable: {list(RUNTIME_FIELDS)}")
    if full is not None:
        d = dict(full)
        d["variant"] = _variant(d.get("variant", "pi0"), weights_variant, path / FULL_CONFIG)
    elif hf.is_transformers_config(conf):
        d = hf.from_transformers_config(conf)
        d["variant"] = _variant("pi0", weights_variant, path / CONFIG)
    else:  # a checkpoint written by lerobot / openpi: only the standard sizes exist there
        said = conf.get("type") or ("pi05" if conf.get("pi05") else ("pi0" if "pi05" in conf else None))
        variant = _variant(said, weights_variant, path / CONFIG)
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
        if variant == "pi05":  # openpi's max_token_len: the pi0.5 prompt also holds the state
            d.setdefault("tokenizer_max_length", 200)
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
        :class:`Checkpoint` with canonical key names (:func:`pi0_keymap.to_canonical`: layout prefix removed, older
        names renamed, the tied embedding taken from whichever name the file holds, unused expert LM parts dropped).

    Raises:
        CheckpointError: a file is missing or unreadable, the config is invalid or names another variant than the
            weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(path)
    for f in (WEIGHTS, CONFIG):
        if not (d / f).is_file():
            raise CheckpointError(f"checkpoint directory {str(d)!r} has no {f}; expected the openpi PyTorch / "
                                  f"lerobot layout ({WEIGHTS}, {CONFIG}, {TOKENIZER})")
    conf = read_json(d / CONFIG, CheckpointError)
    full = read_json(d / FULL_CONFIG, CheckpointError) if (d / FULL_CONFIG).is_file() else None
    try:
        raw = load_file(str(d / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{d / WEIGHTS} is unreadable or truncated ({type(e).__name__}: {e})") from e
    try:
        tensors, layout = km.to_canonical(raw)
    except ValueError as e:
        raise CheckpointError(f"{d / WEIGHTS}: {e}") from e
    if hf.is_transformers_config(conf):
        layout = "transformers"  # its save_pretrained writes bare openpi-like names
    cfg = _config_from_json(conf, full, d, overrides, km.detect_variant(tensors))
    try:
        # after the variant is known: it decides the default normalisation mode
        processor = resolve_processor(d, conf, cfg)
    except StatisticsError as e:
        raise CheckpointError(str(e)) from e
    return Checkpoint(cfg, tensors, processor, layout)


def _fmt(keys: list[str]) -> str:
    more = f" ... (+{len(keys) - _LIST_LIMIT} more)" if len(keys) > _LIST_LIMIT else ""
    return ", ".join(keys[:_LIST_LIMIT]) + more


def _groups(keys: list[str]) -> str:
    return ", ".join(k if n == 1 else f"{n} under {k}" for k, n in km.group_keys(keys))


def _shape(v: Any) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def _likely_cause(expected: Mapping[str, Any], found: Mapping[str, Any], missing: list[str], unexpected: list[str],
                  shapes: list[str], layout: str | None) -> str:
    ev, fv = km.detect_variant(expected), km.detect_variant(found)
    if ev and fv and ev != fv:
        return (f"the weights are {fv} but the model was built as {ev}: set the variant in config.json "
                f"(lerobot 'type') to {fv!r}")
    gm, gu = km.group_keys(missing, 2), km.group_keys(unexpected, 2)
    if gm and gu and gm[0][1] == gu[0][1] > 1 and gm[0][0].endswith(".*") and gu[0][0].endswith(".*"):
        pm, pu = gm[0][0][:-1], gu[0][0][:-1]
        if {k[len(pm):] for k in missing if k.startswith(pm)} == {k[len(pu):] for k in unexpected if k.startswith(pu)}:
            return (f"the file names {gm[0][1]} tensors '{pu}*' where pi0's module tree has '{pm}*': a naming no "
                    f"known layout uses (lerobot 0.3 / 0.4, openpi, transformers; docs/pi0_checkpoints.md); rename "
                    f"these keys")
    if shapes and not missing and not unexpected:
        return ("the sizes in config.json / fastnft_config.json (max_action_dim, max_state_dim, widths, vocab) do "
                "not match the weights' shapes listed above: fix the config")
    if missing and not unexpected:
        return ("the file lacks these tensors: a partial save (only the trained expert, or only the prefix) or a "
                "file of another model")
    where = f"read as the '{layout}' layout" if layout else "read"
    return (f"the file's keys were {where}; the keys above fit no known pi0 layout (lerobot 0.3 / 0.4, openpi, "
            f"transformers; docs/pi0_checkpoints.md)")


def check_keys(expected: Mapping[str, Any], found: Mapping[str, Any], where: str, layout: str | None = None) -> None:
    """Compare canonical names and shapes (tensors, or shapes as sequences); raise one error for every difference.

    Raises:
        CheckpointError: missing and unexpected keys grouped by prefix with counts (:func:`pi0_keymap.group_keys`),
            each ``key: checkpoint shape vs model shape``, and the likely cause (variant, unknown naming, sizes,
            partial file).
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: checkpoint {_shape(found[k])} vs model {_shape(expected[k])}"
              for k in sorted(set(expected) & set(found)) if _shape(found[k]) != _shape(expected[k])]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_groups(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_groups(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes)}")
        lay = f" (layout '{layout}')" if layout else ""
        raise CheckpointError(f"checkpoint {where}{lay} does not fit the model (canonical key names, "
                              f"docs/pi0_checkpoints.md): " + "; ".join(parts) +
                              ". Likely cause: " + _likely_cause(expected, found, missing, unexpected, shapes, layout))


def load_into(model: nn.Module, tensors: Mapping[str, Tensor], where: str | Path, check_finite: bool = True,
              layout: str | None = None) -> None:
    """Copy ``tensors`` (canonical names, :func:`read_checkpoint`) into ``model`` after :func:`check_keys` (and a
    finiteness check), in the model's dtypes.

    Raises:
        CheckpointError: key/shape differences, or a tensor with NaN / inf (named).
    """
    expected = km.model_expected(model.state_dict())
    check_keys({c: v for c, (_, v) in expected.items()}, tensors, str(where), layout)
    if check_finite:
        for k, v in tensors.items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"checkpoint {where}: tensor {k} holds NaN or inf values (corrupted file?)")
    model.load_state_dict({expected[c][0]: v for c, v in tensors.items()}, strict=False)
