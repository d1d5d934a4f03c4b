"""Start a training command, SIGKILL it once a checkpoint exists, and say where the kill landed.

Shared by the kill -9 / ``--resume`` tests (bandit, bf16, pi0). The child's stderr goes to a file, not a pipe: a full
pipe would block the trainer before the kill and the test would wait for nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fastnft.engine.checkpoint import list_checkpoints


def kill_after_checkpoint(cmd: list[str], run: Path, at_least: int, *, env: dict[str, str] | None = None,
                          cwd: Path | None = None, log: Path, timeout_s: float = 600.0) -> int:
    """Run ``cmd``, SIGKILL it as soon as ``run`` holds a checkpoint of iteration >= ``at_least``, wait for it.

    Returns the iteration of the newest checkpoint left after the kill. Fails the test (with the child's stderr,
    from ``log``) when the child exits before the kill, or when no such checkpoint appears within ``timeout_s``.
    """
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=cwd, env=env)
    deadline = time.time() + timeout_s
    reached = False
    while time.time() < deadline and proc.poll() is None:
        ck = list_checkpoints(run)
        if ck and ck[-1][0] >= at_least:
            reached = True
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"training exited (code {proc.returncode}) before the kill:\n{log.read_text()[-3000:]}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if not reached:
        pytest.fail(f"no checkpoint of iteration >= {at_least} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
    return list_checkpoints(run)[-1][0]
