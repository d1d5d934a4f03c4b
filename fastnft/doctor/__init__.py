"""``fastnft doctor``: the first command on a GPU machine. Runs every GPU check and says what passed.

    fastnft doctor                      # table on stdout, JSON in doctor.json
    fastnft doctor --json runs/doctor.json --only kernels_cuda,cuda_graph

Prints a pass / fail / skipped table with the seconds each check took and what it checks, then what no row covers,
and writes the same as JSON (``results[i].what``, ``unchecked``). Without CUDA
the CPU-side checks run and every GPU check is listed as skipped, with the reason. The checks live in
:mod:`fastnft.doctor.checks`; the whole run is bounded to about ten minutes on one GPU. Exit status: 0 when no
check failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["CheckResult", "format_results", "main", "run_doctor"]


@dataclass
class CheckResult:
    """One row of the table.

    Attributes:
        name: check name (``kernels_cuda``).
        status: ``pass``, ``fail`` or ``skipped``.
        seconds: wall time of the check.
        gpu: whether the check needs a GPU.
        detail: the result line, the failure, or why it was skipped.
        what: what the check checks (its one-line description).
    """

    name: str
    status: str
    seconds: float
    gpu: bool
    detail: str
    what: str = ""


def run_doctor(only: list[str] | None = None, budget_s: float = 600.0) -> list[CheckResult]:
    """Run the checks (all, or those named in ``only``) in order; a failing check never stops the others.

    The whole run is bounded by ``budget_s`` seconds: a child check gets at most the time left (it fails when it
    runs out), and checks after the budget is spent are skipped with that reason.

    Raises:
        ValueError: a name in ``only`` is not a check.
    """
    from fastnft.doctor.checks import CHECKS, NO_CUDA, Skip, run_in_child

    names = [c.name for c in CHECKS]
    unknown = [n for n in (only or []) if n not in names]
    if unknown:
        raise ValueError(f"unknown doctor check(s) {unknown}; choose from {', '.join(names)}")
    results = []
    deadline = time.perf_counter() + budget_s
    for check in CHECKS:
        if only and check.name not in only:
            continue
        t0 = time.perf_counter()
        left = deadline - t0
        try:
            if check.gpu and not torch.cuda.is_available():
                raise Skip(NO_CUDA)
            if left < 5:
                raise Skip(f"the doctor's time budget of {budget_s:.0f} s is spent")
            if check.isolate:
                status, detail = run_in_child(check, timeout=min(check.timeout, left))
            else:
                detail, status = check.fn(), "pass"
        except Skip as e:
            detail, status = str(e), "skipped"
        except Exception as e:  # noqa: BLE001 - every failure becomes a row, the next check still runs
            last = traceback.extract_tb(e.__traceback__)[-1]
            detail = f"{type(e).__name__}: {str(e)[:600]} ({Path(last.filename).name}:{last.lineno})"
            status = "fail"
        results.append(CheckResult(check.name, status, time.perf_counter() - t0, check.gpu, detail, check.what))
    return results


def format_results(results: list[CheckResult], unchecked: list[str] | None = None) -> str:
    """The Markdown table (check, status, seconds, what it checks, detail), the counts, and what no row covers."""
    rows = ["| check | status | seconds | checks | detail |", "|---|---|---|---|---|"]
    rows += [f"| {r.name} | {r.status.upper() if r.status == 'fail' else r.status} | {r.seconds:.1f} | "
             f"{r.what.replace('|', '/')} | {r.detail.replace('|', '/')} |" for r in results]
    n = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skipped")}
    rows.append(f"\n{n['pass']} passed, {n['fail']} failed, {n['skipped']} skipped")
    if unchecked:
        rows.append("\nNot covered by any row (check these by hand on a GPU):")
        rows += [f"- {u}" for u in unchecked]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastnft doctor`` (also ``python -m fastnft.doctor``)."""
    p = argparse.ArgumentParser(prog="fastnft doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_doctor_args(p)
    return run_from_args(p.parse_args(argv))


def add_doctor_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the ``doctor`` command (shared with the CLI)."""
    p.add_argument("--json", default="doctor.json", help="where to write the results as JSON (default doctor.json)")
    p.add_argument("--only", default="", help="comma-separated check names to run (default: all)")


def run_from_args(args: argparse.Namespace) -> int:
    """Run, print the table, write the JSON; 1 if a check failed."""
    only = [n for n in args.only.split(",") if n]
    from fastnft.doctor.checks import UNCOVERED

    results = run_doctor(only or None)
    print(format_results(results, UNCOVERED))
    out = {"cuda_available": torch.cuda.is_available(),
           "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if torch.cuda.is_available() else [],
           "torch": torch.__version__, "results": [asdict(r) for r in results], "unchecked": list(UNCOVERED)}
    from fastnft.atomic import write_json_atomic

    write_json_atomic(args.json, out)
    print(f"results written to {args.json}")
    return 1 if any(r.status == "fail" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
