"""Multi-run grids: StepNFT, label controls and the Flow-GRPO reference over several SFT starts and RL seeds, one
command, one JSON per finished run, a summary with intervals and a plot.

    fastnft grid --spec configs/grids/pickcube.yaml            # run every missing run, then summarise
    fastnft grid --spec configs/grids/pickcube.yaml --list     # the runs and whether their result exists
    fastnft grid --spec configs/grids/pickcube.yaml --only d65__stepnft__s0 --only d65__shuffled__s0
    fastnft grid --spec configs/grids/pickcube.yaml --summarize

A run is ``<start>__<arm>__s<seed>``: the SFT start (a set of overrides, e.g. a demo count), the arm (StepNFT, a
label control, GRPO: more overrides) and the RL seed (``train.seed``). Each finished run writes
``<results_dir>/runs/<run>.json`` atomically and is skipped on the next call, so the grid can be split over
sessions and a kill loses at most the run in progress (which resumes from its checkpoints).

Every evaluation of a run uses the same held-out seeds and the same per-episode sampler noise
(:func:`fastnft.loop.evaluate.evaluate_policy`), so gains are paired per episode
(:func:`fastnft.report.paired_diff_interval`).
"""

from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fastnft.atomic import atomic_write, write_json_atomic
from fastnft.config import ConfigError, ExperimentConfig, config_to_dict, load_config
from fastnft.report import draw_success_curves, mean_interval, paired_diff_interval

__all__ = ["GridArm", "GridRun", "GridSpec", "grid_runs", "load_grid_spec", "reuse_finished_runs", "run_grid",
           "summarize_grid"]


@dataclass
class GridArm:
    """One arm of the grid (an algorithm or a control) run at some starts with some seeds."""

    name: str
    """Arm name (``stepnft``, ``shuffled``, ``zero``, ``grpo``, ...); part of the run id."""
    seeds: list[int]
    """RL seeds (``train.seed``) of this arm."""
    starts: list[str] | None = None
    """Start names this arm runs at; None = every start."""
    overrides: list[str] = field(default_factory=list)
    """``section.key=value`` overrides of this arm (e.g. ``train.label_control=shuffled``, ``algo=grpo``)."""


@dataclass
class GridSpec:
    """A grid: a base config, common overrides, SFT starts and arms."""

    base_config: str
    """The experiment YAML every run starts from (``configs/pickcube_stepnft.yaml``)."""
    results_dir: str
    """Folder of the committed evidence: ``runs/<run>.json``, ``summary.json``, ``curves.png``."""
    run_root: str
    """Folder of the runs' working directories (checkpoints, metrics); not committed."""
    overrides: list[str]
    """Overrides applied to every run (e.g. the iteration budget)."""
    starts: dict[str, list[str]]
    """Start name -> overrides that select its SFT policy (e.g. ``sft.num_demos=30``)."""
    arms: list[GridArm]
    """The arms."""
    reuse_results: str | None = None
    """Results folder of another grid (``results/grid``) whose finished runs stand in for this grid's runs of the
    same id and settings (a lever's baseline arms), copied instead of rerun: :func:`reuse_finished_runs`."""


@dataclass
class GridRun:
    """One run of the grid."""

    run_id: str
    start: str
    arm: str
    seed: int
    overrides: list[str]


def _str_list(v: Any, key: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"grid spec key '{key}': expected a list of 'section.key=value' strings, got {v!r}")
    return v


def load_grid_spec(path: str | Path) -> GridSpec:
    """Read a grid YAML (see ``configs/grids/pickcube.yaml``).

    Raises:
        ConfigError: missing file, unknown or missing keys, wrong types, an arm naming an unknown start.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"grid spec {str(p)!r} does not exist; pass e.g. --spec configs/grids/pickcube.yaml")
    data = yaml.safe_load(p.read_text()) or {}
    known = {"base_config", "results_dir", "run_root", "overrides", "starts", "arms", "reuse_results"}
    unknown = set(data) - known
    if unknown:
        raise ConfigError(f"grid spec {str(p)!r}: unknown keys {sorted(unknown)}; valid keys: {sorted(known)}")
    for k in ("base_config", "results_dir", "run_root", "starts", "arms"):
        if k not in data:
            raise ConfigError(f"grid spec {str(p)!r}: missing key '{k}'")
    starts = data["starts"]
    if not isinstance(starts, dict) or not starts:
        raise ConfigError("grid spec key 'starts': expected a mapping start name -> list of overrides")
    starts = {str(k): _str_list(v, f"starts.{k}") for k, v in starts.items()}
    arms = []
    for j, a in enumerate(data["arms"] or []):
        if not isinstance(a, dict) or "name" not in a or "seeds" not in a:
            raise ConfigError(f"grid spec key 'arms[{j}]': needs 'name' and 'seeds' (and optional 'starts', "
                              "'overrides')")
        bad = set(a) - {"name", "seeds", "starts", "overrides"}
        if bad:
            raise ConfigError(f"grid spec key 'arms[{j}]': unknown keys {sorted(bad)}")
        st = a.get("starts")
        if st is not None:
            missing = [s for s in st if s not in starts]
            if missing:
                raise ConfigError(f"grid spec arm {a['name']!r} names unknown starts {missing}; known: "
                                  f"{sorted(starts)}")
        if not isinstance(a["seeds"], list) or not all(isinstance(s, int) for s in a["seeds"]) or not a["seeds"]:
            raise ConfigError(f"grid spec arm {a['name']!r}: 'seeds' must be a non-empty list of integers")
        arms.append(GridArm(name=str(a["name"]), seeds=list(a["seeds"]), starts=st,
                            overrides=_str_list(a.get("overrides"), f"arms[{j}].overrides")))
    if not arms:
        raise ConfigError("grid spec key 'arms': needs at least one arm")
    reuse = data.get("reuse_results")
    if reuse is not None and not isinstance(reuse, str):
        raise ConfigError(f"grid spec key 'reuse_results': expected a results folder such as results/grid, got "
                          f"{reuse!r}")
    return GridSpec(base_config=str(data["base_config"]), results_dir=str(data["results_dir"]),
                    run_root=str(data["run_root"]), overrides=_str_list(data.get("overrides"), "overrides"),
                    starts=starts, arms=arms, reuse_results=reuse)


def grid_runs(spec: GridSpec) -> list[GridRun]:
    """Every run of the grid, seed-major so that the first pass covers each arm and start once."""
    out = []
    max_seeds = max(len(a.seeds) for a in spec.arms)
    for k in range(max_seeds):
        for start in spec.starts:
            for arm in spec.arms:
                if k >= len(arm.seeds) or (arm.starts is not None and start not in arm.starts):
                    continue
                seed = arm.seeds[k]
                rid = f"{start}__{arm.name}__s{seed}"
                ov = [*spec.overrides, *spec.starts[start], *arm.overrides, f"train.seed={seed}",
                      f"run_dir={Path(spec.run_root) / rid}"]
                out.append(GridRun(run_id=rid, start=start, arm=arm.name, seed=seed, overrides=ov))
    return out


def result_path(spec: GridSpec, run_id: str) -> Path:
    """``<results_dir>/runs/<run_id>.json``."""
    return Path(spec.results_dir) / "runs" / f"{run_id}.json"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, list[str]]:
    """Compare two resolved configs, apart from ``run_dir``, on the keys both have; also return the keys only one
    has (a key added or renamed by later code, whose default keeps the old behaviour)."""
    fa, fb = _flat(a), _flat(b)
    shared = (set(fa) & set(fb)) - {"run_dir"}
    return all(fa[k] == fb[k] for k in shared), sorted(set(fa) ^ set(fb))


def reuse_finished_runs(spec: GridSpec) -> list[str]:
    """Copy finished runs of ``spec.reuse_results`` into this grid where this grid lacks them.

    A run is copied when the other grid holds a result of the same run id whose resolved config has the same
    value for every setting both configs have (``run_dir`` apart); the copy records ``reused_from`` and the
    settings only one side has (``reuse_unmatched_keys``). A run whose settings differ is left to run.
    Returns the ids copied (none without ``reuse_results``).
    """
    import json

    if not spec.reuse_results:
        return []
    copied = []
    for run in grid_runs(spec):
        src = Path(spec.reuse_results) / "runs" / f"{run.run_id}.json"
        dst = result_path(spec, run.run_id)
        if dst.exists() or not src.is_file():
            continue
        res = json.loads(src.read_text())
        same, unmatched = _same_settings(res.get("config", {}),
                                         config_to_dict(load_config(spec.base_config, run.overrides)))
        if not same:
            print(f"[grid] {run.run_id}: {src} has other settings; not reused", flush=True)
            continue
        write_json_atomic(dst, {**res, "reused_from": src.as_posix(), "reuse_unmatched_keys": unmatched})
        copied.append(run.run_id)
    return copied


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _run_one(spec: GridSpec, run: GridRun, progress: bool) -> dict[str, Any]:
    import json

    from fastnft.engine import dist as fdist
    from fastnft.envs import make_env
    from fastnft.experiments.sft import run_sft_stage
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.io import load_policy

    cfg: ExperimentConfig = load_config(spec.base_config, run.overrides)
    t0 = time.time()
    sft_path, _ = run_sft_stage(cfg, progress=False)
    sft_s = time.time() - t0
    from fastnft.devices import resolve_device

    fdist.init_distributed(device=resolve_device(cfg.device))
    policy, _ = load_policy(sft_path, cfg)
    env = make_env(cfg.env)
    t0 = time.time()
    try:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        trainer = StepNFTTrainer(cfg, policy, env, resume=True, progress=progress)
        history = trainer.train()
    finally:
        env.close()
    train_s = time.time() - t0  # this process only: a resumed run's earlier segments are not in it
    metrics = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    it_rows = [m for m in metrics if "rollout/success_rate" in m]
    first, last = history[0], history[-1]
    d, lo, hi = paired_diff_interval(first["per_episode"], last["per_episode"])
    return {
        "run_id": run.run_id, "start": run.start, "arm": run.arm, "seed": run.seed,
        "sft_policy": str(sft_path), "sft_s": sft_s, "train_s": train_s,
        "iterations": cfg.train.iterations, "episodes_per_iter": cfg.train.episodes_per_iter,
        "start_success": first["success_rate"], "final_success": last["success_rate"],
        "gain": {"points": 100 * d, "ci95": [100 * lo, 100 * hi], "method": "paired per episode"},
        "history": history,
        "per_iteration": {k: [m.get(k) for m in it_rows] for k in (
            "rollout/success_rate", "labels/positive_share", "signal/cos_halves", "signal/label_share",
            "signal/grad_norm", "update/grad_norm", "fresh/drift", "replayed/drift", "update/lr", "ema/decay",
            "perf/iteration_s")},
        "diagnostics_mean": {k: _mean([m.get(k) for m in it_rows]) for k in (
            "signal/cos_halves", "signal/label_share", "fresh/logit_abs", "update/grad_norm")},
        "config": config_to_dict(cfg), "overrides": run.overrides, "git_commit": _git_commit(),
        "torch_threads": torch.get_num_threads(),  # bit-reproducibility holds for one thread count
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run_grid(spec: GridSpec, *, only: list[str] | None = None, force: bool = False,
             progress: bool = True) -> list[str]:
    """Run every grid run whose result file is missing (or those in ``only``), one after another, then
    :func:`summarize_grid`. Returns the ids of the runs completed by this call.

    Raises:
        ConfigError: ``only`` names a run that is not in the grid.
    """
    runs = grid_runs(spec)
    ids = {r.run_id for r in runs}
    for o in only or []:
        if o not in ids:
            raise ConfigError(f"--only {o!r} is not a run of this grid; `fastnft grid --spec ... --list` lists them")
    if not force:
        for rid in reuse_finished_runs(spec):
            print(f"[grid] {rid}: reused from {spec.reuse_results}", flush=True)
    done = []
    for run in runs:
        if only and run.run_id not in only:
            continue
        out = result_path(spec, run.run_id)
        if out.exists() and not force:
            continue
        print(f"[grid] {run.run_id}: start", flush=True)
        res = _run_one(spec, run, progress)
        write_json_atomic(out, res)
        done.append(run.run_id)
        g = res["gain"]
        print(f"[grid] {run.run_id}: {100 * res['start_success']:.1f} -> {100 * res['final_success']:.1f} % "
              f"({g['points']:+.1f} points, 95 % CI {g['ci95'][0]:+.1f} .. {g['ci95'][1]:+.1f}), "
              f"{res['train_s'] / 60:.1f} min -> {out}", flush=True)
        summarize_grid(spec)
    return done


def _avg_outcomes(lists: list[list[int]]) -> list[float]:
    return [sum(v) / len(v) for v in zip(*lists)]


def summarize_grid(spec: GridSpec) -> dict[str, Any]:
    """Aggregate the finished runs into ``<results_dir>/summary.json`` and ``<results_dir>/curves.png``.

    Per arm: the mean gain across runs with a Student-t 95 % interval (each run's gain is its own paired final -
    start difference). Per start: StepNFT's final outcomes (averaged over its seeds, per episode) against each
    control's final outcomes on the same episodes, as a paired difference with a 95 % interval; StepNFT "beats"
    a control at a start when that interval lies above 0. The first arm of the spec is the method compared.
    Per run: its gain, run times and the means over iterations of the update's signal diagnostics
    (``signal/cos_halves``, ``signal/label_share``: :func:`fastnft.loop.update.gradient_signal`).
    """
    import json

    res_dir = Path(spec.results_dir) / "runs"
    results = [json.loads(p.read_text()) for p in sorted(res_dir.glob("*.json"))] if res_dir.is_dir() else []
    arms: dict[str, dict[str, Any]] = {}
    for r in results:
        a = arms.setdefault(r["arm"], {"runs": [], "gains": []})
        a["runs"].append({"run_id": r["run_id"], "start": r["start"], "seed": r["seed"],
                          "start_success": r["start_success"], "final_success": r["final_success"],
                          "gain_points": r["gain"]["points"], "gain_ci95": r["gain"]["ci95"],
                          "train_min": r["train_s"] / 60,
                          # summed over every segment of a resumed run (train_s counts only the last one);
                          # evaluations excluded
                          "iterations_min": sum(x for x in r["per_iteration"].get("perf/iteration_s", [])
                                                if isinstance(x, (int, float))) / 60,
                          # means over iterations of the update's signal diagnostics (fastnft.loop.update)
                          "diagnostics_mean": r.get("diagnostics_mean", {})})
        a["gains"].append(r["gain"]["points"])
    for a in arms.values():
        a["gain_points"] = mean_interval(a.pop("gains"))
    by_start: dict[str, Any] = {}
    for start in spec.starts:
        rs = [r for r in results if r["start"] == start]
        if not rs:
            continue
        entry: dict[str, Any] = {"start_success": _mean([r["start_success"] for r in rs])}
        ref = spec.arms[0].name  # the first arm is the method; the others are compared with it
        main = [r["history"][-1]["per_episode"] for r in rs if r["arm"] == ref]
        if main:
            avg = _avg_outcomes(main)
            entry[f"{ref}_final"] = sum(avg) / len(avg)
            for r in rs:
                if r["arm"] == ref:
                    continue
                other = r["history"][-1]["per_episode"]
                if len(other) != len(avg):
                    continue
                m, lo, hi = paired_diff_interval(other, avg)
                entry[f"{ref}_minus_{r['arm']}_s{r['seed']}"] = {
                    "points": 100 * m, "ci95": [100 * lo, 100 * hi], "beats": lo > 0}
        by_start[start] = entry
    summary = {"spec": {"base_config": spec.base_config, "overrides": spec.overrides, "starts": spec.starts,
                        "arms": [a.__dict__ for a in spec.arms]},
               "ci_level": 0.95, "runs_finished": len(results), "runs_total": len(grid_runs(spec)),
               "arms": arms, "starts": by_start}
    out = Path(spec.results_dir)
    write_json_atomic(out / "summary.json", summary)
    atomic_write(out / "table.md", lambda f: f.write(summary_table(summary, out / "summary.json")), text=True)
    if results:
        _plot(results, spec, out / "curves.png")
    return summary


def _pm(x: float) -> str:
    return f"{x:+.1f}"


def summary_table(summary: dict[str, Any], source: str | Path) -> str:
    """Markdown tables of a grid summary (the README's results table): every run's start -> final held-out success
    and paired gain, each arm's mean gain across runs with its Student-t interval, and per start the first arm's
    paired difference from each control. Success in %, gains in points, intervals 95 %. Each table cites
    ``source``, the summary file it comes from (the docs' citation convention, tests/test_doc_numbers.py)."""
    src = f"`{Path(source).as_posix()}`"
    lines = [f"Runs finished: {summary['runs_finished']} of {summary['runs_total']} ({src}).", "",
             f"Each run, from its start ({src}):", "",
             "| arm | start | seed | held-out success, start -> end | gain, paired 95 % interval |",
             "|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        for r in sorted(a["runs"], key=lambda r: (r["start"], r["seed"])):
            lo, hi = r["gain_ci95"]
            lines.append(f"| {arm} | {r['start']} | {r['seed']} | {100 * r['start_success']:.2f} % -> "
                         f"{100 * r['final_success']:.2f} % | {_pm(r['gain_points'])} ({_pm(lo)} .. {_pm(hi)}) |")
    lines += ["", f"Mean gain across runs ({src}):", "", "| arm | runs | mean gain, points | 95 % interval across runs (Student t) |", "|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        g = a["gain_points"]
        ci = f"{_pm(g['ci95'][0])} .. {_pm(g['ci95'][1])}" if g["n"] > 1 else "needs 2 runs"
        lines.append(f"| {arm} | {g['n']} | {_pm(g['mean'])} | {ci} |")
    rows = [(start, k, v) for start, e in summary["starts"].items() for k, v in e.items() if isinstance(v, dict)]
    if rows:
        lines += ["", f"Per start, final outcomes paired per episode ({src}):", "",
                  "| start | comparison, final held-out success | difference, points (paired 95 % interval) |",
                  "|---|---|---|"]
        for start, k, v in rows:
            lo, hi = v["ci95"]
            verdict = "above 0" if v["beats"] else "not above 0"
            lines.append(f"| {start} | {k.replace('_minus_', ' - ')} | {_pm(v['points'])} ({_pm(lo)} .. {_pm(hi)}), "
                         f"{verdict} |")
    return "\n".join(lines) + "\n"


def _plot(results: list[dict[str, Any]], spec: GridSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = [s for s in spec.starts if any(r["start"] == s for r in results)]
    fig, axes = plt.subplots(1, len(starts), figsize=(4.2 * len(starts), 3.6), dpi=110, squeeze=False)
    colors = {"stepnft": "C0", "shuffled": "C3", "zero": "C7", "grpo": "C2"}
    for ax, start in zip(axes[0], starts):
        runs = sorted((r for r in results if r["start"] == start), key=lambda r: (r["arm"], r["seed"]))
        curves = {f"{r['arm']} s{r['seed']}": r["history"] for r in runs}
        styles = {f"{r['arm']} s{r['seed']}": {"color": colors.get(r["arm"]), "ls": "-" if r["seed"] == 0 else "--"}
                  for r in runs}
        draw_success_curves(ax, curves, styles, band_alpha=0.08)
        ax.set_title(f"start {start}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
