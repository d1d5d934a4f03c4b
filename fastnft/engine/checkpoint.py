"""Atomic, resumable checkpoints: ``run_dir/checkpoints/ckpt_<iteration>.pt`` plus a ``latest.json`` pointer.

Write protocol (rank 0 only), so that a ``kill -9`` or power loss at any instant leaves a loadable latest:

1. ``torch.save`` into a temp file in the same folder, flush + fsync it;
2. ``os.replace`` it onto ``ckpt_<iteration>.pt`` (atomic on POSIX) and fsync the folder (1-2:
   :func:`fastnft.atomic.torch_save_atomic`);
3. write ``latest.json`` the same way (temp, fsync, replace, fsync folder) - the commit point;
4. delete checkpoints older than the newest ``keep`` (never the one ``latest.json`` names) and stale temp files.

:func:`load_latest` follows ``latest.json``; when it is missing or names an unreadable file it falls back to the
newest readable ``ckpt_*.pt`` (with a warning). A readable checkpoint written for another config is never
skipped: it raises :class:`CheckpointError` naming the differing config keys and the fix.

A checkpoint is a plain dict (weights_only-loadable: tensors, numbers, strings, lists, dicts)::

    {"format": 1, "iteration": int, "config_fingerprint": {key: value}, **state}
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from fastnft.atomic import TMP_PREFIX, atomic_write, torch_save_atomic
from fastnft.engine import dist as fdist

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "checkpoint_dir",
    "config_fingerprint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_LATEST = "latest.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file, the problem and the fix."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    """The config values a checkpoint must agree with to be resumable (model shapes and the task).

    Args:
        cfg: an :class:`~fastnft.config.ExperimentConfig` (or anything with ``.policy`` and ``.env``).

    Returns:
        Flat ``{"policy.width": 128, ..., "env.task": "PickCube-v1", ...}`` of plain values.
    """
    from fastnft.config import config_to_dict

    out: dict[str, Any] = {f"policy.{k}": v for k, v in config_to_dict(cfg.policy).items()}
    for k in ("task", "control_mode", "obs_mode", "cameras", "image_size", "instruction"):
        out[f"env.{k}"] = getattr(cfg.env, k)
    return out


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(iteration, path)]`` of the finished checkpoint files, oldest first (temp files excluded)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / p) for p in os.listdir(d) if (m := _NAME.match(p))]
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, iteration: int, state: dict[str, Any], *,
                    fingerprint: dict[str, Any] | None = None, keep: int = 2) -> Path | None:
    """Atomically write ``state`` as the checkpoint of ``iteration`` and point ``latest.json`` at it.

    Only rank 0 writes; every rank returns after a barrier, so no rank can read a half-written checkpoint.

    Args:
        run_dir: the run's output folder (``checkpoints/`` is created inside).
        iteration: completed training iterations (the resume point), >= 0.
        state: plain containers of tensors / numbers / strings (e.g. ``{"actor": ..., "ema": ..., "rng": ...}``);
            the keys ``format``, ``iteration`` and ``config_fingerprint`` are reserved.
        fingerprint: :func:`config_fingerprint` of the run's config, checked by :func:`load_latest`.
        keep: number of newest checkpoints kept (>= 1).

    Returns:
        The checkpoint path on rank 0, None on the other ranks.

    Raises:
        ValueError: ``keep < 1``, ``iteration < 0`` or a reserved key in ``state``.
    """
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep={keep} must be >= 1")
    if iteration < 0:
        raise ValueError(f"save_checkpoint: iteration={iteration} must be >= 0")
    reserved = {"format", "iteration", "config_fingerprint"} & set(state)
    if reserved:
        raise ValueError(f"save_checkpoint: state uses reserved keys {sorted(reserved)}; rename them")
    path = None
    if fdist.is_main():
        d = checkpoint_dir(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"ckpt_{iteration:08d}.pt"
        payload = {"format": FORMAT_VERSION, "iteration": int(iteration),
                   "config_fingerprint": dict(fingerprint or {}), **state}
        torch_save_atomic(path, payload)
        pointer = json.dumps({"iteration": int(iteration), "file": path.name}).encode()
        atomic_write(d / _LATEST, lambda f: f.write(pointer))
        _prune(d, keep, current=path.name)
    fdist.barrier()
    return path


def _prune(d: Path, keep: int, current: str) -> None:
    ckpts = [p for _, p in list_checkpoints(d.parent)]
    for p in ckpts[:-keep]:
        if p.name != current:
            p.unlink(missing_ok=True)
    for name in os.listdir(d):  # temp files of writes killed earlier (ours finished or were removed)
        if name.startswith(TMP_PREFIX):
            (d / name).unlink(missing_ok=True)


def _read(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / not a torch file
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable ({type(e).__name__}: {reason}); delete it to "
                              "resume from an older checkpoint, or start a fresh run_dir") from e
    if not isinstance(obj, dict) or "iteration" not in obj or "format" not in obj:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a fastnft checkpoint (no 'format'/'iteration' "
                              "keys); point run_dir at a folder written by fastnft or start a fresh run_dir")
    return obj


def _validate(path: Path, obj: dict[str, Any], fingerprint: dict[str, Any] | None,
              required_keys: tuple[str, ...]) -> None:
    if obj["format"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format {obj['format']} but this fastnft reads "
                              f"format {FORMAT_VERSION}; resume with the fastnft version that wrote it or start "
                              "a fresh run_dir")
    missing = [k for k in required_keys if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the entries {missing}; it was written by another "
                              "tool or version - start a fresh run_dir")
    if fingerprint is not None:
        saved = obj.get("config_fingerprint") or {}
        diffs = [f"{k}={saved.get(k, '<absent>')!r} but the config has {v!r}" for k, v in fingerprint.items()
                 if k in saved and saved[k] != v]
        if diffs:
            raise CheckpointError(f"checkpoint {str(path)!r} was written for " + "; ".join(diffs)
                                  + ". Pass the matching config (same values) or start a fresh run_dir.")


def load_checkpoint(path: str | os.PathLike, *, fingerprint: dict[str, Any] | None = None,
                    required_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load and validate one checkpoint file (all ranks may call it).

    Raises:
        CheckpointError: unreadable/truncated file, foreign format, missing ``required_keys``, or a
            ``fingerprint`` value that differs from the saved one (each differing key is named).
    """
    p = Path(path)
    obj = _read(p)
    _validate(p, obj, fingerprint, required_keys)
    return obj


def load_latest(run_dir: str | os.PathLike, *, fingerprint: dict[str, Any] | None = None,
                required_keys: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]] | None:
    """The newest loadable checkpoint of ``run_dir`` as ``(iteration, state)``, or None for a fresh run.

    ``state`` is the dict given to :func:`save_checkpoint` plus ``config_fingerprint``/``format``/``iteration``.
    Order tried: the file named by ``latest.json``, then the other ``ckpt_*.pt`` newest first; unreadable
    (truncated, corrupt) files are skipped with a warning.

    Raises:
        CheckpointError: a readable checkpoint is incompatible (``fingerprint`` or ``required_keys``), or
            checkpoint files exist but none is readable.
    """
    d = checkpoint_dir(run_dir)
    candidates = [p for _, p in reversed(list_checkpoints(run_dir))]
    try:
        pointed = d / json.loads((d / _LATEST).read_text())["file"]
        if pointed in candidates:
            candidates.remove(pointed)
            candidates.insert(0, pointed)
        else:
            log.warning("checkpoint pointer %s names missing file %s; using the newest checkpoint file instead",
                        d / _LATEST, pointed.name)
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("checkpoint pointer %s is unreadable (%s); using the newest checkpoint file", d / _LATEST, e)
    errors = []
    for p in candidates:
        try:
            obj = _read(p)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            errors.append(str(e))
            continue
        _validate(p, obj, fingerprint, required_keys)
        return int(obj["iteration"]), obj
    if errors:
        raise CheckpointError(f"no readable checkpoint in {str(d)!r}: " + " | ".join(errors))
    return None
