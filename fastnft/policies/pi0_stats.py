"""Normalisation statistics of a pi0 / pi0.5 checkpoint directory: where they are read from, which mode applies,
the refusal when there are none, and the files written beside a saved policy. See ``docs/pi0_statistics.md``.

Sources, first found wins:

1. lerobot 0.4.x processor files: ``policy_preprocessor.json`` / ``policy_postprocessor.json`` and the normaliser
   ``.safetensors`` they name (:mod:`fastnft.policies.lerobot_files`); fastnft writes these too.
2. ``fastnft_processor.safetensors``: what fastnft wrote before it wrote lerobot's files (read, no longer written).
3. lerobot 0.3.x buffers inside ``model.safetensors`` (``normalize_inputs.buffer_observation_state.mean``, ...).
4. openpi: ``assets/<asset_id>/norm_stats.json`` (``{"norm_stats": {"state": {...}, "actions": {...}}}``, each with
   ``mean``, ``std``, ``q01``, ``q99`` lists; openpi's ``shared/normalize.py``). Several asset ids are refused
   unless ``pi0.asset_id`` names one.

Mode (``pi0.normalization: auto``): fastnft_processor.json's ``norm_mode``, else the lerobot ``norm_map`` /
config.json ``normalization_mapping``, else the variant's default as in both ports: ``mean_std`` for pi0,
``quantile`` (q01 / q99) for pi0.5 (openpi's ``use_quantile_norm = model_type != PI0``, lerobot's ``PI05Config``).
``pi0.normalization: mean_std | quantile`` forces a mode; ``identity`` switches normalisation off and is the only way
to load a checkpoint without statistics (an identity mapping written in the checkpoint's own files counts too).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastnft.atomic import atomic_write
from fastnft.policies.lerobot_files import (
    ACTION_KEY,
    FoundStats,
    StatisticsError,
    mode_from_mapping,
    read_lerobot03_buffers,
    read_lerobot_processor,
    write_lerobot_processor,
)
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, NormStats

__all__ = ["LEGACY_STATS", "NORM_STATS", "OPENPI_EPS", "PROC_CONFIG", "StatisticsError", "read_json", "read_openpi_norm_stats",
           "resolve_processor", "write_openpi_norm_stats", "write_processor_files"]

log = logging.getLogger(__name__)

ASSETS, NORM_STATS = "assets", "norm_stats.json"
LEGACY_STATS, PROC_CONFIG, TOKENIZER = "fastnft_processor.safetensors", "fastnft_processor.json", "tokenizer.model"
OPENPI_EPS = 1e-6  # openpi transforms.Normalize / Unnormalize
_NEEDS = {"mean_std": ("mean", "std"), "quantile": ("q01", "q99"), "identity": ()}
_OPENPI_KEYS = {STATE_KEY: "state", ACTION_KEY: "actions"}
_HOW_TO_ADD = (f"add lerobot's policy_preprocessor.json + policy_postprocessor.json with the normaliser "
               f".safetensors files they name (copy them from the lerobot checkpoint or dataset run the weights came "
               f"from), or openpi's {ASSETS}/<asset_id>/{NORM_STATS} (from the openpi checkpoint's assets/ folder, or "
               f"openpi's scripts/compute_norm_stats.py); see docs/pi0_statistics.md. To run without normalisation "
               f"on purpose, set policy.pi0.normalization: identity")


# -- openpi ------------------------------------------------------------------------------------------------------
def _asset_ids(root: Path) -> list[str]:
    # openpi's asset id is often a dataset repo id with a slash (physical-intelligence/libero): search the tree
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob(NORM_STATS)) if root.is_dir() else []


def read_openpi_norm_stats(path: str | Path, asset_id: str | None = None) -> FoundStats | None:
    """openpi's ``assets/<asset_id>/norm_stats.json`` in checkpoint directory ``path``.

    Args:
        path: the checkpoint directory.
        asset_id: which asset; None = the only one there.

    Returns:
        :class:`FoundStats` (mode None: the variant decides; openpi's formulas, eps 1e-6), or None when the
        directory has no ``norm_stats.json``.

    Raises:
        StatisticsError: several asset ids and none chosen, the chosen one is absent, or the file is malformed.
    """
    root = Path(path) / ASSETS
    ids = _asset_ids(root)
    if asset_id is None:
        if not ids:
            return None
        if len(ids) > 1:
            raise StatisticsError(f"{root} holds statistics of several robots/datasets {ids}; name the one this "
                                  "policy runs with: policy.pi0.asset_id: <one of them>")
        asset_id = ids[0]
    p = root / asset_id / NORM_STATS
    if not p.is_file():
        raise StatisticsError(f"pi0.asset_id={asset_id!r} but {p} does not exist; asset ids there: {ids or 'none'}")
    try:
        blob = json.loads(p.read_text())["norm_stats"]
        out = {}
        for ours, theirs in _OPENPI_KEYS.items():
            st = blob[theirs]
            out[ours] = NormStats(**{k: (torch.tensor(st[k], dtype=torch.float32) if st.get(k) is not None else None)
                                     for k in ("mean", "std", "q01", "q99")})
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise StatisticsError(f"{p} is not openpi's norm_stats.json format ({type(e).__name__}: {e}); expected "
                              '{"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]}, '
                              '"actions": {...}}}') from e
    return FoundStats(None, out[STATE_KEY], out[ACTION_KEY], "openpi", OPENPI_EPS, str(p))


def write_openpi_norm_stats(path: str | Path, asset_id: str, state: NormStats, action: NormStats) -> Path | None:
    """Write ``assets/<asset_id>/norm_stats.json`` in openpi's format (atomically); None (nothing written) when
    ``mean`` / ``std`` are missing, which openpi's ``NormStats`` requires."""
    if any(getattr(st, k) is None for st in (state, action) for k in ("mean", "std")):
        return None
    blob = {"norm_stats": {_OPENPI_KEYS[feat]: {k: (v.tolist() if (v := getattr(st, k)) is not None else None)
                                                for k in ("mean", "std", "q01", "q99")}
                           for feat, st in ((STATE_KEY, state), (ACTION_KEY, action))}}
    p = Path(path) / ASSETS / asset_id / NORM_STATS
    p.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(blob, indent=2)
    return atomic_write(p, lambda f: f.write(text), text=True)


# -- resolution --------------------------------------------------------------------------------------------------
def _legacy(d: Path, pc: dict[str, Any] | None) -> FoundStats | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if pc is None or not (d / LEGACY_STATS).is_file():
        return None
    try:
        flat = load_file(str(d / LEGACY_STATS))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise StatisticsError(f"{d / LEGACY_STATS} is unreadable ({type(e).__name__}: {e})") from e
    return FoundStats(pc.get("norm_mode"), NormStats.from_tensors(flat, STATE_KEY),
                      NormStats.from_tensors(flat, ACTION_KEY), "openpi", OPENPI_EPS, str(d / LEGACY_STATS))


def _fit_width(st: NormStats, dim: int, name: str, found: FoundStats, need: tuple[str, ...]) -> NormStats:
    """The statistics cut to the first ``dim`` entries (openpi slices longer statistics the same way). A statistic
    the mode needs must be there and wide enough; the others are kept when they fit (a later save carries them)."""
    out = {}
    for k in ("mean", "std", "q01", "q99"):
        v = getattr(st, k)
        if v is None:
            if k in need:
                hint = " (lerobot: augment the dataset with quantile statistics)" if k in ("q01", "q99") else ""
                raise StatisticsError(f"{found.source} has no {name} statistic {k!r}, which normalisation "
                                      f"{'/'.join(need)} needs{hint}; add it, or choose another "
                                      "policy.pi0.normalization")
            continue
        v = v.reshape(-1)
        fits = v.numel() == dim or (v.numel() > dim and found.convention == "openpi")
        if not fits and k in need:
            field = "state_dim" if name == STATE_KEY else "action_dim"
            raise StatisticsError(f"{found.source}: {name} statistic {k!r} has {v.numel()} entries but the policy's "
                                  f"{name} has {dim} (pi0.{field}); use statistics of this robot, or set "
                                  f"pi0.{field} to the robot's width")
        if fits:
            out[k] = v[:dim].float()
    return NormStats(**out)


def read_json(path: Path, error: type[Exception]) -> Any:
    """The JSON in ``path``; a malformed file raises ``error`` naming it (checkpoint files are user input)."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e})") from e


def resolve_processor(path: str | Path, conf: dict[str, Any], cfg: Pi0Config) -> dict[str, Any] | None:
    """The processor of checkpoint directory ``path`` (the blob :meth:`Pi0Processor.from_export` reads).

    Args:
        path: the checkpoint directory.
        conf: its parsed config.json (lerobot's ``normalization_mapping`` is read from it).
        cfg: the policy config (``normalization``, ``asset_id``, ``variant``, ``state_dim``, ``action_dim``).

    Returns:
        ``{"norm_mode", "tensors", "tokenizer_file", "tokenizer", "norm_convention", "norm_eps", "stats_source"}``,
        or None when normalisation is identity and there is no tokenizer (observations arrive processed).

    Raises:
        StatisticsError: no statistics for a non-identity mode (the message names the files to add and the
            ``normalization: identity`` switch), ambiguous openpi asset ids, missing statistics or widths.
    """
    d = Path(path)
    pc = read_json(d / PROC_CONFIG, StatisticsError) if (d / PROC_CONFIG).is_file() else None
    if pc is not None:
        tok_file, tok_kind = pc.get("tokenizer_file"), pc.get("tokenizer")
    else:
        tok_file = TOKENIZER if (d / TOKENIZER).is_file() else None
        tok_kind = "sentencepiece" if tok_file else None

    found = None
    if cfg.normalization != "identity":
        found = (read_lerobot_processor(d) or _legacy(d, pc) or read_lerobot03_buffers(d / "model.safetensors")
                 or read_openpi_norm_stats(d, cfg.asset_id))
    if cfg.normalization != "auto":
        mode = cfg.normalization
    else:
        mode = ((pc or {}).get("norm_mode") or (found.mode if found else None)
                or mode_from_mapping(conf.get("normalization_mapping"), str(d / "config.json"))
                or ("mean_std" if cfg.variant == "pi0" else "quantile"))
    if mode == "identity":
        if cfg.normalization == "auto":
            log.warning("checkpoint %s: its own files set normalisation IDENTITY; state and actions are not "
                        "normalised", d)
        if tok_file is None and tok_kind is None:
            return None
        return {"norm_mode": "identity", "tensors": {}, "tokenizer_file": tok_file, "tokenizer": tok_kind,
                "norm_convention": "openpi", "norm_eps": OPENPI_EPS, "stats_source": None}
    if found is None:
        raise StatisticsError(f"checkpoint {d} has no normalisation statistics, and pi0 / pi0.5 need them "
                              f"({mode} for this {cfg.variant} checkpoint): {_HOW_TO_ADD}")
    need = _NEEDS[mode]
    state = _fit_width(found.state, cfg.state_dim, STATE_KEY, found, need)
    action = _fit_width(found.action, cfg.action_dim, ACTION_KEY, found, need)
    convention = (pc or {}).get("norm_convention", found.convention)
    eps = float((pc or {}).get("norm_eps", found.eps))
    log.info("checkpoint %s: %s normalisation with statistics from %s (%s formulas)", d, mode, found.source,
             convention)
    return {"norm_mode": mode, "tensors": {**state.tensors(STATE_KEY), **action.tensors(ACTION_KEY)},
            "tokenizer_file": tok_file, "tokenizer": tok_kind, "norm_convention": convention, "norm_eps": eps,
            "stats_source": found.source}


# -- writing -----------------------------------------------------------------------------------------------------
def write_processor_files(path: str | Path, cfg: Pi0Config, processor: dict[str, Any] | None,
                          layout: str = "lerobot") -> list[Path]:
    """Write the statistics beside saved weights: lerobot's processor files (always), openpi's
    ``assets/<pi0.asset_id or "fastnft">/norm_stats.json`` (``layout="openpi"``), and ``fastnft_processor.json``
    (mode, formulas, tokenizer kind) so fastnft reloads exactly what it saved.

    Args:
        path: the checkpoint directory (exists).
        cfg: the policy config.
        processor: :meth:`Pi0Processor.export`, or None (no processor: identity, no tokenizer).
        layout: ``lerobot`` or ``openpi``.

    Returns:
        The files written.
    """
    d = Path(path)
    blob = processor or {"norm_mode": "identity", "tensors": {}}
    mode = blob["norm_mode"]
    flat: dict[str, Tensor] = dict(blob["tensors"]) if mode != "identity" else {}
    eps = float(blob.get("norm_eps", OPENPI_EPS))
    written = write_lerobot_processor(d, cfg, mode, flat, eps=eps)
    if layout == "openpi" and flat:
        p = write_openpi_norm_stats(d, cfg.asset_id or "fastnft", NormStats.from_tensors(flat, STATE_KEY),
                                    NormStats.from_tensors(flat, ACTION_KEY))
        written += [p] if p else []
    (d / LEGACY_STATS).unlink(missing_ok=True)  # an older save's copy would disagree with the files above
    if processor is not None:
        pc = json.dumps({"norm_mode": mode, "norm_convention": blob.get("norm_convention", "openpi"), "norm_eps": eps,
                         "tokenizer_file": TOKENIZER if blob.get("tokenizer_file") else None,
                         "tokenizer": blob.get("tokenizer"), "statistics": "policy_preprocessor.json"}, indent=2)
        written.append(atomic_write(d / PROC_CONFIG, lambda f: f.write(pc), text=True))
    return written
