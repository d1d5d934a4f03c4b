"""LIBERO's files and suite data, no simulator: the manifest check (a tampered, missing or extra file is refused
by its path), the offline asset links, the private config, suite metadata and the seed -> episode map."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastnft.config import ConfigError, EnvConfig
from fastnft.envs.libero_assets import (
    MANIFEST,
    LiberoAssetError,
    git_blob_sha1,
    libero_root,
    link_assets,
    read_manifest,
    verify_tree,
)
from fastnft.envs.libero_suites import (
    EPISODE_LIMITS,
    HELDOUT_STATES,
    NUM_STATES,
    PERMUTATION,
    SUITES,
    episode_for_seed,
    seed_for_episode,
)

REPO = Path(__file__).resolve().parents[1]
# CI checks out shared/ next to the clone; a dev worktree one level deeper.
FIXTURE = next((p for p in (REPO.parent / "shared" / "fixtures" / "libero" / "upstream-manifest.tsv",
                            REPO.parent.parent / "shared" / "fixtures" / "libero" / "upstream-manifest.tsv")
                if p.is_file()), REPO.parent / "shared" / "fixtures" / "libero" / "upstream-manifest.tsv")


def _libero_installed() -> tuple[bool, str]:
    try:
        libero_root()
        from fastnft.envs.libero_assets import wheel_assets

        wheel_assets()
    except LiberoAssetError as e:
        return False, str(e)
    return True, ""


_OK, _WHY = _libero_installed()
needs_libero = pytest.mark.skipif(not _OK, reason=f"LIBERO not installed: {_WHY}")


@pytest.mark.skipif(not FIXTURE.is_file(), reason=f"no shared fixture at {FIXTURE} (only in CI / dev checkouts)")
def test_shipped_manifest_equals_the_fixture():
    assert MANIFEST.read_bytes() == FIXTURE.read_bytes()


def test_manifest_lists_the_upstream_files():
    entries = read_manifest()
    assert len(entries) == 970
    top = {}
    for e in entries:
        key = e.path.split("/")[0]
        top[key] = top.get(key, 0) + 1
    assert top == {"assets": 585, "bddl_files": 135, "init_files": 250}
    for suite in SUITES:  # 10 BDDL files (+ tasks_info.txt) per suite
        assert sum(e.path.startswith(f"bddl_files/{suite}/") and e.path.endswith(".bddl") for e in entries) == 10


def test_git_blob_sha1_is_gits(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"hello\n")
    assert git_blob_sha1(f) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `printf 'hello\n' | git hash-object --stdin`


@pytest.fixture
def tree(tmp_path):
    """A small fake LIBERO: source asset folder, manifest of 2 assets + 1 BDDL file, package root."""
    src, root = tmp_path / "wheel", tmp_path / "libero"
    files = {"assets/scenes/a.xml": b"<mujoco/>\n", "assets/textures/t.png": b"\x89PNG..."}
    for rel, data in files.items():
        (src / rel.partition("/")[2]).parent.mkdir(parents=True, exist_ok=True)
        (src / rel.partition("/")[2]).write_bytes(data)
    (src / "extra" / "unknown.obj").parent.mkdir(parents=True)
    (src / "extra" / "unknown.obj").write_bytes(b"v 0 0 0\n")  # in the wheel, not upstream: must not be linked
    (root / "bddl_files" / "s").mkdir(parents=True)
    (root / "bddl_files" / "s" / "task.bddl").write_bytes(b"(define)\n")
    lines = ["# test manifest"]
    for rel, data in {**files, "bddl_files/s/task.bddl": b"(define)\n"}.items():
        p = tmp_path / "tmpfile"
        p.write_bytes(data)
        lines.append(f"{rel}\t{len(data)}\t{git_blob_sha1(p)}")
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    return src, root, manifest


def test_link_then_verify_accepts_exact_files(tree):
    src, root, manifest = tree
    dest = link_assets(root, src, manifest)
    linked = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_symlink())
    assert linked == ["scenes/a.xml", "textures/t.png"]  # the wheel's extra file is not linked
    assert verify_tree(root, manifest) == 3
    link_assets(root, src, manifest)  # idempotent
    assert verify_tree(root, manifest) == 3


def test_tampered_asset_is_refused_by_path(tree):
    src, root, manifest = tree
    link_assets(root, src, manifest)
    (src / "textures" / "t.png").write_bytes(b"\x89PNG,,,")  # same size, other bytes
    with pytest.raises(LiberoAssetError, match=r"t\.png differs from upstream assets/textures/t\.png"):
        verify_tree(root, manifest)
    with pytest.raises(LiberoAssetError, match=r"t\.png differs"):
        link_assets(root, src, manifest)  # linking refuses it too
    (src / "textures" / "t.png").write_bytes(b"short")
    with pytest.raises(LiberoAssetError, match=r"t\.png has 5 bytes"):
        verify_tree(root, manifest)


def test_missing_and_extra_files_are_refused(tree):
    src, root, manifest = tree
    link_assets(root, src, manifest)
    (root / "assets" / "scenes" / "extra.xml").write_text("<mujoco/>")
    with pytest.raises(LiberoAssetError, match=r"extra\.xml, which upstream LIBERO does not have"):
        verify_tree(root, manifest)
    (root / "assets" / "scenes" / "extra.xml").unlink()
    (root / "bddl_files" / "s" / "task.bddl").unlink()
    with pytest.raises(LiberoAssetError, match=r"missing: .*task\.bddl"):
        verify_tree(root, manifest)


@needs_libero
def test_installed_libero_files_match_upstream():
    assert verify_tree(libero_root()) == 970


@needs_libero
def test_import_with_stdin_closed_and_no_config(tmp_path):
    """LIBERO is used with no ~/.libero, no LIBERO_CONFIG_PATH and stdin closed: no prompt, no config written to
    the user's home, the suite's files found."""
    code = textwrap.dedent("""
        import os, sys
        from fastnft.envs.libero_suites import suite_tasks, init_states
        ts = suite_tasks("libero_goal")
        import libero.libero.envs  # LIBERO's env code imports under the private config
        from libero.libero import get_libero_path
        print(len(ts), init_states("libero_goal", 0).shape[0], ts[0].instruction)
        print(os.environ["LIBERO_CONFIG_PATH"] != "", get_libero_path("bddl_files"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "LIBERO_CONFIG_PATH"}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, check=False, capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "10 50 open the middle drawer of the cabinet"
    assert lines[-1].startswith("True ") and lines[-1].endswith("bddl_files")
    assert not (tmp_path / ".libero").exists()


@needs_libero
def test_suite_metadata_four_suites_ten_tasks_fifty_states():
    from fastnft.envs.libero_suites import init_states, suite_tasks

    assert EPISODE_LIMITS == {"libero_spatial": 240, "libero_object": 240, "libero_goal": 320, "libero_10": 480}
    for suite in SUITES:
        tasks = suite_tasks(suite)
        assert len(tasks) == 10
        assert len({t.instruction for t in tasks}) == 10 and all(t.instruction for t in tasks)
        for t in tasks:
            assert t.bddl.is_file() and t.bddl.parent.name == suite
            s = init_states(suite, t.index)
            assert s.shape[0] == NUM_STATES and s.dtype == np.float64
            assert len({row.tobytes() for row in s}) == NUM_STATES  # 50 distinct states
    assert suite_tasks("libero_object")[0].instruction == "pick up the alphabet soup and place it in the basket"


def test_seeds_cover_each_pair_once_per_500():
    assert sorted(PERMUTATION.tolist()) == list(range(500))
    for start in (0, 123, 1_000_000):
        pairs = [episode_for_seed(s) for s in range(start, start + 500)]
        assert len(set(pairs)) == 500
    first = [episode_for_seed(s)[0] for s in range(8)]  # an iteration's episodes mix tasks
    assert len(set(first)) >= 4
    for t, k in [(0, 0), (3, 7), (9, 49)]:
        s = seed_for_episode(t, k, 1_000_000)
        assert 1_000_000 <= s < 1_000_500 and episode_for_seed(s) == (t, k)


def test_heldout_split_separates_states():
    train = {episode_for_seed(s, "heldout", 1_000_000) for s in range(400)}
    held = {episode_for_seed(s, "heldout", 1_000_000) for s in range(1_000_000, 1_000_100)}
    assert len(train) == 400 and len(held) == 100
    assert all(k not in HELDOUT_STATES for _, k in train) and all(k in HELDOUT_STATES for _, k in held)
    with pytest.raises(ValueError, match="libero_split"):
        episode_for_seed(0, "other")


def test_env_config_libero_fields():
    assert EnvConfig(task="libero_goal").max_episode_steps == 320
    assert EnvConfig(task="libero_10").max_episode_steps == 480
    assert EnvConfig(task="libero_object", max_episode_steps=7).max_episode_steps == 7
    assert EnvConfig().max_episode_steps == 100  # ManiSkill default unchanged
    cfg = EnvConfig(task="libero_object", obs_mode="rgb", cameras=["agentview", "wrist"],
                    camera_slots={"agentview": "base_0_rgb"})
    assert cfg.camera_slots == {"agentview": "base_0_rgb"}
    with pytest.raises(ConfigError, match="env.cameras"):
        EnvConfig(task="libero_object", obs_mode="rgb", cameras=["base_camera"])
    with pytest.raises(ConfigError, match="env.camera_slots"):
        EnvConfig(task="libero_object", obs_mode="rgb", cameras=["agentview"], camera_slots={"wrist": "x"})
