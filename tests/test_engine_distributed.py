"""ActorEngine under DeepSpeed on CPU (gloo): 1 plain process vs 2 ranks, ZeRO 0-3, resume across world sizes.

Oracle: ``engine_worker.reference_trajectory`` (full-batch torch AdamW + clip_grad_norm_, no DeepSpeed). With 2
ranks each takes half of every global batch; the rank-averaged gradient is the full-batch gradient, so losses,
grad norms, weights and EMA weights must match the oracle to float32 round-off.

Launches (each a fresh interpreter; ~3-6 s each on 2 CPU cores once the DeepSpeed comm op is cached in
TORCH_EXTENSIONS_DIR, default ~/.cache/fastnft/torch_extensions; the first build ever takes ~20 s more):
  A: 1 process, ZeRO-0, saves its state after step 2     B: 2 ranks, ZeRO-2, saves after step 2
  C: 2 ranks, ZeRO-3, resumes from A (1 -> 2 ranks)       D: 1 process, ZeRO-1, resumes from B (2 -> 1 rank)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import engine_worker as W
import numpy as np
import pytest

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
WORKER = str(Path(__file__).resolve().parent / "engine_worker.py")
TOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(out: Path, nproc: int, *args: str) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:  # a plain process: the engine creates its own gloo group of size 1
        cmd = [sys.executable, WORKER]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER]
    proc = subprocess.run([*cmd, "--out", str(out), *args], check=False, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)  # a hang guard only
    assert proc.returncode == 0, f"worker failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    root = tmp_path_factory.mktemp("engine")
    res = {"A": _launch(root / "A", 1, "--stage", "0", "--save-at", "2"),
           "B": _launch(root / "B", 2, "--stage", "2", "--save-at", "2")}
    res["C"] = _launch(root / "C", 2, "--stage", "3", "--resume", str(root / "A" / "state.pt"))
    res["D"] = _launch(root / "D", 1, "--stage", "1", "--resume", str(root / "B" / "state.pt"))
    return res


@pytest.fixture(scope="module")
def ref() -> dict:
    return W.reference_trajectory()


def _maxdiff(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(np.subtract(a[n], b[n])).max()) for n in a)


@pytest.mark.parametrize("run", ["A", "B", "C", "D"])
def test_trajectory_matches_full_batch_adamw(runs: dict, ref: dict, run: str) -> None:
    for out in runs[run]:
        s = out["start"]
        assert s == (0 if run in "AB" else 2) and out["global_steps"] == W.STEPS
        np.testing.assert_allclose(out["losses"], ref["losses"][s:], rtol=0, atol=TOL)
        np.testing.assert_allclose(out["grad_norms"], ref["grad_norms"][s:], rtol=0, atol=TOL)
        assert out["lrs"] == [W.LR] * (W.STEPS - s)
        trainable = {n: ref["params"][n] for n in out["params"]}
        assert set(out["params"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
        assert _maxdiff(out["params"], trainable) < TOL
        assert _maxdiff(out["ema"], ref["ema"]) < TOL
        assert _maxdiff(out["frozen"], {n: ref["params"][n] for n in out["frozen"]}) == 0.0


def test_clipping_was_active(ref: dict) -> None:
    """Guard on the oracle: some steps exceed grad_clip, so a wrong clip setting would change the trajectory."""
    assert max(ref["grad_norms"]) > W.GRAD_CLIP > min(ref["grad_norms"])


def test_two_ranks_hold_identical_ema_and_weights(runs: dict) -> None:
    for run in ("B", "C"):
        r0, r1 = runs[run]
        assert (r0["world_size"], r1["world_size"]) == (2, 2) and (r0["rank"], r1["rank"]) == (0, 1)
        assert r0["ema"] == r1["ema"] and r0["params"] == r1["params"]


_SHUTDOWN_SCRIPT = """
import os
from fastnft.engine import dist as fdist
launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ports = []
for _ in range(2):
    assert fdist.init_distributed(device="cpu") == (0, 1)
    ports.append(os.environ["MASTER_PORT"])
    fdist.shutdown_distributed()
    assert not fdist.is_initialized(), "group still alive after shutdown_distributed"
    assert not any(k in os.environ for k in launch), "self-made launch variables left behind"
fdist.shutdown_distributed()  # no group: a no-op
print("ok", *ports)
"""


def test_shutdown_destroys_the_group_and_allows_a_new_one() -> None:
    """shutdown_distributed tears the self-made single-process world down (and its launch variables), so a
    second init_distributed in the same process builds a fresh group rather than reusing the released port."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", _SHUTDOWN_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # hang guard only
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1].split()  # DeepSpeed prints its own lines before
    assert last[0] == "ok" and len(last) == 3, proc.stdout[-2000:]
