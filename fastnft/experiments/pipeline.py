"""The main job: demonstrations -> few-shot SFT -> π-StepNFT -> held-out evaluation -> report (+ S8 ablations).

    fastnft pipeline --config configs/pickcube_stepnft.yaml [--ablations]

Writes into ``run_dir``: ``report.json``, ``report.md`` (the table), ``success_curve.png``, plus each training
run's own folder (metrics, TensorBoard events, checkpoints). SFT and StepNFT are evaluated on the SAME held-out
seeds (``env.eval_seed ...``), which no training or demo episode uses.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from fastnft.atomic import write_json_atomic
from fastnft.config import ExperimentConfig, config_to_dict
from fastnft.report import diff_interval, format_table, plot_success_curves

__all__ = ["ABLATIONS", "run_pipeline", "variant_config"]

# S8 variants of the ablation table: name -> config changes (each from the same SFT start).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "stepnft": {},
    "wmse": {"nft": {"loss": "wmse"}},
    "positive_only": {"nft": {"branches": "positive"}},
    "negative_only": {"nft": {"branches": "negative"}},
    "ode_rollouts": {"nft": {"rollout": "ode"}},
}


def variant_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """``cfg`` with the S8 variant ``name`` applied and its own run folder ``<run_dir>/ablation_<name>``.

    Raises:
        ValueError: unknown variant (the message lists the known ones).
    """
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    out = cfg
    for section, changes in ABLATIONS[name].items():
        out = dataclasses.replace(out, **{section: dataclasses.replace(getattr(out, section), **changes)})
    return dataclasses.replace(out, run_dir=str(Path(cfg.run_dir) / f"ablation_{name}"))


def _train_one(cfg: ExperimentConfig, policy_path: Path, env, resume: bool,
               progress: bool) -> tuple[list, float, dict[str, float]]:
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.io import load_policy

    policy, _ = load_policy(policy_path, cfg)
    t0 = time.time()
    trainer = StepNFTTrainer(cfg, policy, env, resume=resume, progress=progress)
    history = trainer.train()
    return history, time.time() - t0, dict(trainer.phase_s)


def run_pipeline(cfg: ExperimentConfig, *, ablations: list[str] | None = None, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Run the whole main job in this process (single rank) and write the report.

    Returns:
        The report dict (also written to ``<run_dir>/report.json``).
    """
    from fastnft.devices import resolve_device
    from fastnft.engine import dist as fdist
    from fastnft.envs import make_env
    from fastnft.experiments.demos import demo_path
    from fastnft.experiments.sft import run_sft_stage

    t_start = time.time()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    if cfg.env.task != "bandit":
        from fastnft.experiments.demos import generate_demos

        t0 = time.time()
        generate_demos(cfg, demo_path(cfg), num_demos=cfg.demos.num_demos)
        stages["demos_s"] = time.time() - t0
    t0 = time.time()
    sft_path, sft_meta = run_sft_stage(cfg, progress=progress)
    stages["sft_s"] = time.time() - t0
    fdist.init_distributed(device=resolve_device(cfg.device))
    env = make_env(cfg.env)
    runs: dict[str, dict[str, Any]] = {}
    try:
        names = ["stepnft"] + [a for a in (ablations or []) if a != "stepnft"]
        for name in names:
            vcfg = cfg if name == "stepnft" else variant_config(cfg, name)
            hist, secs, phases = _train_one(vcfg, sft_path, env, resume, progress)
            runs[name] = {"history": hist, "train_s": secs, "phase_s": phases, "run_dir": vcfg.run_dir}
    finally:
        env.close()
    main = runs["stepnft"]["history"]
    start, final = main[0], main[-1]
    d, lo, hi = diff_interval(start["successes"], start["episodes"], final["successes"], final["episodes"])
    rows = [{"policy": "SFT (start)", "success_rate": start["success_rate"], "ci": _ci(start),
             "episodes": start["episodes"], "wall_s": round(stages["sft_s"], 1)},
            {"policy": "Flow-GRPO" if cfg.algo == "grpo" else "π-StepNFT", "success_rate": final["success_rate"],
             "ci": _ci(final), "episodes": final["episodes"], "wall_s": round(runs["stepnft"]["train_s"], 1)}]
    ablation_rows = [{"variant": n, "success_rate": r["history"][-1]["success_rate"], "ci": _ci(r["history"][-1]),
                      "episodes": r["history"][-1]["episodes"], "wall_s": round(r["train_s"], 1)}
                     for n, r in runs.items()]
    cols = [("policy", "policy"), ("success_rate", "held-out success"), ("ci", "95 % CI"),
            ("episodes", "episodes"), ("wall_s", "wall time (s)")]
    table = format_table(rows, cols)
    gain = f"gain {100 * d:+.1f} points (95 % CI {100 * lo:+.1f} .. {100 * hi:+.1f})"
    md = [f"# {cfg.name}: {cfg.env.task}", "", table, "", gain, ""]
    if len(runs) > 1:
        md += ["## Ablations (S8), same SFT start and held-out seeds", "",
               format_table(ablation_rows, [("variant", "variant")] + cols[1:]), ""]
    stages["total_s"] = time.time() - t_start
    ph = runs["stepnft"]["phase_s"]
    for k in ("rollout_env", "rollout_policy", "rollout_other", "update", "diagnostics", "evaluation"):
        stages[f"{k}_s"] = ph.get(k, 0.0)
    rollout_s = ph.get("rollout_env", 0.0) + ph.get("rollout_policy", 0.0) + ph.get("rollout_other", 0.0)
    stages["rollout_env_steps_per_s"] = ph.get("env_steps", 0.0) / max(rollout_s, 1e-9)
    md += ["Where the time went (wall seconds; the rollout's env steps per second over training episodes):", "",
           format_table([{"phase": k.removesuffix("_s"), "value": round(v, 1)} for k, v in stages.items()],
                        [("phase", "phase"), ("value", "seconds (or steps/s)")]), ""]
    plot = plot_success_curves({n: r["history"] for n, r in runs.items()}, run_dir / "success_curve.png",
                               f"{cfg.env.task}: held-out success vs iteration")
    report = {"task": cfg.env.task, "sft": start, "stepnft": final, "gain": {"points": d, "ci95": [lo, hi]},
              "runs": runs, "stages": stages, "sft_meta": {k: v for k, v in sft_meta.items() if k != "key"},
              "plot": str(plot), "config": config_to_dict(cfg)}
    write_json_atomic(run_dir / "report.json", report)
    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return report


def _ci(h: dict[str, float]) -> str:
    return f"[{h['ci_low']:.3f}, {h['ci_high']:.3f}]"
