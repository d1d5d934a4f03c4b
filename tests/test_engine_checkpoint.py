"""Atomic checkpoints: round trip, crash leftovers, kill -9 while writing, incompatible-config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastnft.config import ExperimentConfig, PolicyConfig
from fastnft.engine import CheckpointError, config_fingerprint, load_latest, save_checkpoint
from fastnft.engine.checkpoint import checkpoint_dir, list_checkpoints

REPO = Path(__file__).resolve().parents[1]


def _state(it: int) -> dict:
    return {"actor": {"params": {"w": torch.full((3, 4), float(it))}, "optim": {"step": it}},
            "ema": {"params": {"w": torch.arange(5.0) + it}, "num_updates": it}, "note": f"it{it}"}


def test_round_trip_keep_and_pointer(tmp_path: Path) -> None:
    fp = config_fingerprint(ExperimentConfig())
    assert load_latest(tmp_path) is None
    for it in (5, 10, 15):
        path = save_checkpoint(tmp_path, it, _state(it), fingerprint=fp, keep=2)
        assert path is not None and path.is_file()
    assert [it for it, _ in list_checkpoints(tmp_path)] == [10, 15]
    assert json.loads((checkpoint_dir(tmp_path) / "latest.json").read_text())["iteration"] == 15
    it, state = load_latest(tmp_path, fingerprint=fp, required_keys=("actor", "ema"))
    assert it == 15 and state["iteration"] == 15 and state["note"] == "it15"
    torch.testing.assert_close(state["actor"]["params"]["w"], torch.full((3, 4), 15.0))
    assert state["ema"]["num_updates"] == 15
    assert not [n for n in os.listdir(checkpoint_dir(tmp_path)) if n.startswith(".tmp")]


def test_crash_leftovers_fall_back_to_previous_good(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, 1, _state(1))
    save_checkpoint(tmp_path, 2, _state(2))
    d = checkpoint_dir(tmp_path)
    good = (d / "ckpt_00000002.pt").read_bytes()
    # a write killed before os.replace: temp file left behind, pointer untouched
    (d / ".tmp-ckpt_00000003.pt.abc").write_bytes(good[: len(good) // 2])
    # a truncated newest file that the pointer does not name yet
    (d / "ckpt_00000003.pt").write_bytes(good[: len(good) // 3])
    assert load_latest(tmp_path)[0] == 2
    # the pointer names a truncated file (e.g. lost page cache): skip it with a warning, use the previous one
    (d / "latest.json").write_text(json.dumps({"iteration": 3, "file": "ckpt_00000003.pt"}))
    it, state = load_latest(tmp_path)
    assert it == 2 and state["note"] == "it2"
    assert "ckpt_00000003.pt" in caplog.text and "unreadable" in caplog.text
    # a broken pointer is not fatal either
    (d / "latest.json").write_text("{not json")
    assert load_latest(tmp_path)[0] == 2
    # the next save removes stale temp files
    save_checkpoint(tmp_path, 4, _state(4))
    assert not [n for n in os.listdir(d) if n.startswith(".tmp")]
    assert load_latest(tmp_path)[0] == 4


def test_nothing_readable_raises_naming_the_files(tmp_path: Path) -> None:
    d = checkpoint_dir(tmp_path)
    d.mkdir(parents=True)
    (d / "ckpt_00000007.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"ckpt_00000007\.pt.*unreadable.*fresh run_dir"):
        load_latest(tmp_path)
    torch.save({"weights": torch.zeros(2)}, d / "ckpt_00000008.pt")  # readable but not ours
    with pytest.raises(CheckpointError, match="not a fastnft checkpoint"):
        load_latest(tmp_path)


def test_incompatible_config_error_names_key_and_fix(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 3, _state(3), fingerprint=config_fingerprint(ExperimentConfig()))
    other = config_fingerprint(ExperimentConfig(policy=PolicyConfig(width=256)))
    with pytest.raises(CheckpointError) as ei:
        load_latest(tmp_path, fingerprint=other)
    msg = str(ei.value)
    assert "ckpt_00000003.pt" in msg and "policy.width=128 but the config has 256" in msg
    assert "matching config" in msg and "fresh run_dir" in msg
    assert "policy.depth" not in msg  # only the differing keys are named
    with pytest.raises(CheckpointError, match=r"lacks the entries \['rng'\]"):
        load_latest(tmp_path, required_keys=("actor", "rng"))


def test_save_rejects_reserved_keys_and_bad_keep(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, {"iteration": 1})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(tmp_path, 1, {}, keep=0)


_WRITER = textwrap.dedent("""
    import sys, torch
    from fastnft.engine import save_checkpoint, load_latest
    run_dir = sys.argv[1]
    prev = load_latest(run_dir)
    it = 0 if prev is None else prev[0] + 1
    big = torch.empty(1_000_000)  # 4 MB per file: writes take long enough to be interrupted
    print("ready", flush=True)
    while True:
        save_checkpoint(run_dir, it, {"payload": big.fill_(float(it)), "it": it}, keep=2)
        it += 1
""")


def _pointed_iteration(run_dir: Path) -> int:
    """The iteration ``latest.json`` points at, -1 before the first checkpoint (the pointer is written atomically)."""
    try:
        return int(json.loads((checkpoint_dir(run_dir) / "latest.json").read_text())["iteration"])
    except FileNotFoundError:
        return -1


def test_kill_9_while_writing_leaves_loadable_latest(tmp_path: Path) -> None:
    """SIGKILL a process that writes checkpoints in a loop, at several moments; latest stays loadable.

    Each round first waits until the writer has moved ``latest.json`` past the previous round's latest (so "each
    round extends the latest" holds however slow a busy machine is), then kills it after a delay, in the middle
    of later writes. The waits' time limits are hang guards, not speed conditions."""
    last = -1
    for delay in (0.35, 0.8, 0.55):
        log = tmp_path / "writer.stderr"
        with log.open("wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=err)
        try:
            guard = time.monotonic() + 600
            while _pointed_iteration(tmp_path) <= last:
                if proc.poll() is not None:
                    pytest.fail(f"the writer exited ({proc.returncode}) before a checkpoint after iteration "
                                f"{last}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > guard:
                    pytest.fail(f"hang guard: the writer wrote no checkpoint after iteration {last} in 600 s:\n"
                                f"{log.read_text()[-3000:]}")
                time.sleep(0.01)
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        got = load_latest(tmp_path)
        assert got is not None
        it, state = got
        assert it > last, "each round must resume from and extend the previous latest"
        assert state["it"] == it and torch.all(state["payload"] == float(it))
        last = it
