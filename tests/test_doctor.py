"""``fastnft doctor`` as CI runs it: the table and the JSON, every GPU check listed (skipped with the reason on a
machine without CUDA), the CPU-side checks passing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fastnft.doctor.checks import CHECKS, NO_CUDA

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
        assert f"| {c.name} | {r['status']} |" in proc.stdout  # the printed table row
        if not c.gpu:
            assert r["status"] == "pass", r
        elif not torch.cuda.is_available():
            assert r["status"] == "skipped" and r["detail"] == NO_CUDA, r
    assert report["cuda_available"] == torch.cuda.is_available()
    assert f"{sum(not c.gpu for c in CHECKS)} passed, 0 failed" in proc.stdout or torch.cuda.is_available()


def test_unknown_check_name_is_an_input_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastnft.cli", "doctor", "--only", "kernels_cdua", "--json",
                           str(tmp_path / "d.json")], capture_output=True, text=True, timeout=120, check=False,
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
