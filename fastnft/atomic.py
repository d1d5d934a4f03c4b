"""Atomic file writes: a kill or power loss at any instant leaves either the old file or the new one, never a torn one.

Protocol of :func:`atomic_write`: write into a temp file in the target's folder (``.tmp-<name>.<random>``), flush and
fsync it, ``os.replace`` it onto the target (atomic on POSIX), fsync the folder. On any error the temp file is
removed and the target is untouched. Temp files left by a kill start with :data:`TMP_PREFIX`, so a writer that owns
a folder (the checkpoint pruner) can sweep them.

    write_json_atomic(run_dir / "report.json", report)
    torch_save_atomic(path, {"policy": ..., "meta": ...})
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TMP_PREFIX", "atomic_write", "torch_save_atomic", "write_json_atomic"]

TMP_PREFIX = ".tmp-"
"""Name prefix of the temp files (a sweep of leftovers from killed writes matches it)."""

_FILE_MODE = 0o644  # mkstemp creates 0600; the files written here are ordinary outputs


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Any], Any], *, text: bool = False,
                 by_name: bool = False) -> Path:
    """Write ``path`` atomically through ``write_fn(f)``, which writes the whole content into the open file ``f``.

    Args:
        path: the target; its folder is created if missing.
        write_fn: called once with a file object opened for writing (binary, or text with ``text=True``); with
            ``by_name=True`` instead with the temp file's name, for writers that take a file name and stream to
            it (``safetensors.torch.save_file``, ``shutil.copyfile``).
        text: open the temp file in text mode (UTF-8) instead of binary.
        by_name: pass the temp file's name, not an open file.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write_fn`` or the file system raises; the temp file is removed and the old ``path`` stays.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{p.name}.", dir=p.parent)
    try:
        if by_name:
            os.close(fd)
            write_fn(tmp)
            _fsync_file(tmp)
        else:
            with os.fdopen(fd, "w" if text else "wb", encoding="utf-8" if text else None) as f:
                write_fn(f)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(p.parent)
    return p


def write_json_atomic(path: str | os.PathLike, obj: Any, **dump_kwargs: Any) -> Path:
    """``json.dump(obj, f, indent=2, **dump_kwargs)`` into ``path`` atomically (:func:`atomic_write`)."""
    dump_kwargs.setdefault("indent", 2)
    return atomic_write(path, lambda f: json.dump(obj, f, **dump_kwargs), text=True)


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj, f)`` into ``path`` atomically (:func:`atomic_write`)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
