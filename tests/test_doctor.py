"""``fastnft doctor`` as CI runs it: the table and the JSON, every GPU check listed (skipped with the reason on a
machine without CUDA), the CPU-side checks passing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastnft.doctor.checks import CHECKS, NO_CUDA, UNCOVERED

REPO = Path(__file__).resolve().parents[1]


def test_doctor_prints_table_and_writes_json(tmp_path):
    out_json = tmp_path / "doctor.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "fastnft.cli", "doctor", "--json", str(out_json)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in report["results"]}
    assert list(rows) == [c.name for c in CHECKS]
    for c in CHECKS:
        r = rows[c.name]
        assert r["status"] in ("pass", "skipped") and r["seconds"] >= 0, r
        assert r["what"] == c.what and len(c.what) > 10  # what the row checks, in the JSON and printed
        assert f"| {c.name} | {r['status']} |" in proc.stdout and f"| {c.what} |" in proc.stdout
        if not c.gpu:
            assert r["status"] == "pass", r
        elif not torch.cuda.is_available():
            assert r["status"] == "skipped" and r["detail"] == NO_CUDA, r
    assert report["cuda_available"] == torch.cuda.is_available()
    assert report["unchecked"] == UNCOVERED and "Not covered by any row" in proc.stdout
    assert all(f"- {u}" in proc.stdout for u in UNCOVERED)
    # the environment rows print the driver and ptxas versions (ptxas from triton's bundled binary)
    assert "ptxas" in rows["driver_and_ptxas"]["detail"] and "driver" in rows["driver_and_ptxas"]["detail"]
    assert f"{sum(not c.gpu for c in CHECKS)} passed, 0 failed" in proc.stdout or torch.cuda.is_available()


def test_unknown_check_name_is_an_input_error(tmp_path):  # timeout 600: a hang guard only
    proc = subprocess.run([sys.executable, "-m", "fastnft.cli", "doctor", "--only", "kernels_cdua", "--json",
                           str(tmp_path / "d.json")], capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and "unknown doctor check" in proc.stderr and "kernels_cuda" in proc.stderr


def test_a_failing_check_is_a_fail_row_and_the_others_still_run(monkeypatch):
    import fastnft.doctor.checks as dc
    from fastnft.doctor import format_results, run_doctor

    def boom():
        raise AssertionError("kernel mismatch")

    def skip():
        raise dc.Skip("needs 2 CUDA devices")

    monkeypatch.setattr(dc, "CHECKS", [dc.Check("a", boom, False, "", isolate=False),
                                       dc.Check("b", skip, False, "", isolate=False),
                                       dc.Check("c", lambda: "fine", False, "", isolate=False)])
    res = run_doctor()
    assert [(r.name, r.status) for r in res] == [("a", "fail"), ("b", "skipped"), ("c", "pass")]
    assert "kernel mismatch" in res[0].detail and res[1].detail == "needs 2 CUDA devices"
    assert "1 passed, 1 failed, 1 skipped" in format_results(res)


def test_checks_after_the_time_budget_are_skipped(monkeypatch):
    import fastnft.doctor.checks as dc
    from fastnft.doctor import run_doctor

    monkeypatch.setattr(dc, "CHECKS", [dc.Check("a", lambda: "ran", False, "", isolate=False)])
    res = run_doctor(budget_s=0.0)
    assert res[0].status == "skipped" and "time budget" in res[0].detail


def test_issue16_rows_are_listed():
    """The first-GPU-run rows (issue 16): SFT on CUDA, pi0 attention auto in fp32 and bf16, pi0 under ZeRO-3, the
    ManiSkill GPU seeding contract; all GPU rows, each saying what it checks."""
    rows = {c.name: c for c in CHECKS}
    for name in ("sft_cuda", "pi0_attention_fp32", "pi0_attention_bf16", "pi0_zero3", "maniskill_gpu_seeding"):
        assert rows[name].gpu and rows[name].isolate, name
    assert not rows["driver_and_ptxas"].gpu


def test_table_shows_what_each_row_checks_and_what_is_unchecked():
    from fastnft.doctor import CheckResult, format_results

    text = format_results([CheckResult("a", "pass", 0.1, False, "ok", "the a-ness of a")], ["b at scale"])
    assert "| a | pass | 0.1 | the a-ness of a | ok |" in text
    assert text.endswith("Not covered by any row (check these by hand on a GPU):\n- b at scale")


def test_first_run_rows_run_on_cpu(monkeypatch):
    """The issue-16 GPU rows' own code, run on CPU (their CUDA requirement lifted): a row that cannot run at all
    (a typo, a wrong key) fails here, not first on a GPU. pi0_zero3 runs in tests/test_doctor.py's child below."""
    from fastnft.doctor import first_run

    monkeypatch.setattr(first_run, "_need_cuda", lambda: torch.device("cpu"))
    assert "40 steps on cpu" in first_run.sft_cuda()
    for row in (first_run.pi0_attention_fp32, first_run.pi0_attention_bf16):
        assert "attention auto -> sdpa: 0 flash-attn calls" in row()


def test_pi0_zero3_row_runs_on_cpu(tmp_path):
    code = ("import torch; from fastnft.doctor import first_run; "
            "first_run._need_cuda = lambda: torch.device('cpu'); print(first_run.pi0_zero3_cuda())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                                                            "MASTER_ADDR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "fastnft" / "torch_extensions"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "1 iteration, loss" in proc.stdout and "frozen tensors whole in the EMA copy" in proc.stdout


def test_pi0_cuda_graph_row_skips_on_cpu_and_its_checks_run_with_the_cpu_graph_stand_in():
    """Issue 22: the row is a GPU row that skips here with the reason; its comparison code runs on CPU through the
    CPU stand-in of CUDA graphs (replays must equal eager exactly there)."""
    from fastnft.doctor import pi0_graphs
    from fastnft.doctor.common import NO_CUDA, Skip
    from fastnft.testing.graphs import RecordingGraphs

    row = {c.name: c for c in CHECKS}["pi0_cuda_graph"]
    assert row.gpu and row.isolate
    if not torch.cuda.is_available():
        with pytest.raises(Skip, match=NO_CUDA.split(" (")[0]):
            pi0_graphs.pi0_cuda_graph()
    graphs = RecordingGraphs()
    r = pi0_graphs.graph_vs_eager(torch.device("cpu"), "float32", depth=2, K=2, B=2, graphs=graphs, reps=1)
    assert r["max_abs"] == 0.0 and r["captures"] == 2 and r["eager_ms"] > 0 and r["graphed_ms"] > 0
    assert [g.replays for g in graphs.captured] == [3, 3, 3 + 1]  # encode + loop (dicts), loop (contexts) + timing
