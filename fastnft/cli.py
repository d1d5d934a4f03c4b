"""``fastnft`` command line: doctor | demos | sft | train | eval | pipeline | grid.

    fastnft doctor                                               # first command on a GPU machine: what works

    fastnft pipeline --config configs/pickcube_stepnft.yaml      # the main job, end to end
    fastnft demos --config configs/pickcube_stepnft.yaml         # motion-planned demonstrations
    fastnft sft --config configs/pickcube_stepnft.yaml           # few-shot flow-matching SFT
    fastnft train --config configs/pickcube_stepnft.yaml [--resume] [--dry-run]
    fastnft eval --config configs/pickcube_stepnft.yaml [--policy data/sft/....pt | --run runs/pickcube_stepnft]
    fastnft eval --config configs/libero_object_pi0.yaml --protocol libero [--suites all] [--run DIR]
    fastnft grid --spec configs/grids/pickcube.yaml [--list | --summarize | --only RUN]   # the evidence grid

Every command takes ``--set section.key=value`` overrides. Errors in the input (config, checkpoint, flags, missing
simulator) exit with status 2 and one message that names the problem and the fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastnft.errors import friendly_errors

__all__ = ["build_parser", "main"]


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("--config", required=config_required, help="experiment YAML (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.iterations=10 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


def _cmd_demos(args: argparse.Namespace) -> None:
    from fastnft.config import load_config
    from fastnft.experiments.demos import demo_path, generate_demos

    cfg = load_config(args.config, args.overrides)
    path = generate_demos(cfg, demo_path(cfg), num_demos=cfg.demos.num_demos)
    print(f"demonstrations: {path}")


def _cmd_sft(args: argparse.Namespace) -> None:
    from fastnft.config import load_config
    from fastnft.experiments.sft import run_sft_stage

    cfg = load_config(args.config, args.overrides)
    path, meta = run_sft_stage(cfg, force=args.force, progress=not args.no_progress)
    print(f"SFT policy: {path} ({meta.get('num_samples')} samples from {meta.get('num_demos')} demos, "
          f"{meta.get('sft_seconds', 0):.0f} s)")


def _cmd_train(args: argparse.Namespace) -> None:
    from fastnft.train import run_train

    out = run_train(args)
    if out["history"]:
        h = out["history"]
        print(f"held-out success {h[0]['success_rate']:.3f} -> {h[-1]['success_rate']:.3f}; run dir {out['run_dir']}")


def _load_eval_policy(args: argparse.Namespace, cfg):  # -> FlowPolicy (imported lazily)
    from fastnft.experiments.sft import sft_checkpoint_path
    from fastnft.policies.io import load_policy, load_run_policy

    if cfg.policy.kind == "pi0":  # a pi0 run's result is its lerobot-layout directory
        from fastnft.policies.pi0 import Pi0Policy

        path = args.policy or Path(args.run or cfg.run_dir) / "policy_final"
        norm = {k: v for k, v in (cfg.policy.pi0 or {}).items() if k in ("normalization", "asset_id")}
        return Pi0Policy.load(path, num_steps=cfg.policy.num_steps, n_action_steps=cfg.policy.n_action_steps, **norm)
    if args.run:
        policy, it = load_run_policy(args.run, cfg, sft_checkpoint_path(cfg))
        print(f"EMA policy of {args.run} at iteration {it}", file=sys.stderr)
        return policy
    policy, _ = load_policy(args.policy or sft_checkpoint_path(cfg), cfg)
    return policy


def _cmd_eval(args: argparse.Namespace) -> None:
    from fastnft.config import load_config
    from fastnft.devices import resolve_device
    from fastnft.envs import make_env
    from fastnft.loop.evaluate import evaluate_policy

    cfg = load_config(args.config, args.overrides)
    device = resolve_device(cfg.device)
    if args.protocol == "libero":  # every (task, init state) pair once; tables in --out
        from fastnft.experiments.libero_protocol import run_protocol_command

        run_protocol_command(args, cfg, lambda: _load_eval_policy(args, cfg).to(device), device)
        return
    n = args.episodes or cfg.train.eval_episodes
    env = make_env(cfg.env)  # first: an unknown task or a missing simulator is the first thing to report
    try:
        policy = _load_eval_policy(args, cfg)
        policy.to(device)
        res = evaluate_policy(policy, env, [cfg.env.eval_seed + j for j in range(n)], cfg.policy.num_steps,
                              device=device, seed=0)  # the trainer's evaluation noise: comparable numbers
    finally:
        env.close()
    print(json.dumps(res))


def _cmd_pipeline(args: argparse.Namespace) -> None:
    from fastnft.config import load_config
    from fastnft.experiments.pipeline import ABLATIONS, run_pipeline

    cfg = load_config(args.config, args.overrides)
    abl = list(ABLATIONS) if args.ablations == "all" else [a for a in (args.ablations or "").split(",") if a]
    for a in abl:
        if a not in ABLATIONS:
            raise ValueError(f"unknown ablation {a!r} in --ablations; choose from {', '.join(ABLATIONS)} or 'all'")
    run_pipeline(cfg, ablations=abl, resume=args.resume, progress=not args.no_progress)


def _cmd_grid(args: argparse.Namespace) -> None:
    from fastnft.experiments.grid import (
        grid_runs,
        load_grid_spec,
        result_path,
        reuse_finished_runs,
        run_grid,
        summarize_grid,
    )

    spec = load_grid_spec(args.spec)
    if args.list:
        for r in grid_runs(spec):
            print(f"{r.run_id:40s} {'done' if result_path(spec, r.run_id).exists() else 'missing'}")
        return
    if args.summarize:
        reuse_finished_runs(spec)  # costs no training: baseline arms that another grid already ran
    else:
        run_grid(spec, only=args.only or None, force=args.force, progress=not args.no_progress)
    s = summarize_grid(spec)
    print(f"grid: {s['runs_finished']}/{s['runs_total']} runs finished; summary in {spec.results_dir}/summary.json")
    for arm, a in s["arms"].items():
        g = a["gain_points"]
        ci = g.get("ci95")
        ci_s = f" (95 % CI {ci[0]:+.1f} .. {ci[1]:+.1f})" if ci else ""
        print(f"  {arm:10s} {g['n']} runs, mean gain {g.get('mean', float('nan')):+.1f} points{ci_s}")


def _cmd_doctor(args: argparse.Namespace) -> None:
    from fastnft.doctor import run_from_args

    rc = run_from_args(args)
    if rc:
        sys.exit(rc)


def build_parser() -> argparse.ArgumentParser:
    """The ``fastnft`` argument parser."""
    from fastnft.train import add_train_args

    p = argparse.ArgumentParser(prog="fastnft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    doc = sub.add_parser("doctor", help="run the GPU checks (CPU-side checks without a GPU); pass/fail/skipped table")
    from fastnft.doctor import add_doctor_args

    add_doctor_args(doc)
    doc.set_defaults(func=_cmd_doctor)
    d = sub.add_parser("demos", help="generate motion-planned demonstrations")
    _common(d)
    d.set_defaults(func=_cmd_demos)
    s = sub.add_parser("sft", help="few-shot supervised flow-matching initialisation")
    _common(s)
    s.add_argument("--force", action="store_true", help="retrain even if a matching SFT policy exists")
    s.set_defaults(func=_cmd_sft)
    t = sub.add_parser("train", help="π-StepNFT online fine-tuning")
    add_train_args(t)
    t.set_defaults(func=_cmd_train)
    e = sub.add_parser("eval", help="held-out success rate of a policy file (ODE sampling)")
    _common(e)
    src = e.add_mutually_exclusive_group()
    src.add_argument("--policy", default=None, help="policy file (default: the config's SFT policy)")
    src.add_argument("--run", default=None, help="a training run directory: evaluate its latest EMA policy")
    e.add_argument("--episodes", type=int, default=None, help="held-out episodes (default train.eval_episodes)")
    e.add_argument("--protocol", choices=["libero"], default=None,
                   help="libero: the LIBERO protocol, every (task, init state) pair once (docs/libero.md)")
    e.add_argument("--suites", default=None, help="--protocol libero: 'all' or comma-separated suites "
                   "(default env.task)")
    e.add_argument("--tasks", default=None, help="--protocol libero: task indices, e.g. 0,1 (default all 10)")
    e.add_argument("--states", default=None, help="--protocol libero: init-state indices (default all 50)")
    e.add_argument("--out", default=None, help="--protocol libero: output folder (default <run_dir>/libero_eval); "
                   "resumed if it holds episodes")
    e.set_defaults(func=_cmd_eval)
    pl = sub.add_parser("pipeline", help="demos -> SFT -> StepNFT -> evaluation -> report")
    _common(pl)
    pl.add_argument("--ablations", default="", help="comma-separated S8 variants (wmse, positive_only, "
                    "negative_only, ode_rollouts) or 'all', each from the same SFT start")
    pl.add_argument("--resume", action="store_true", help="resume each training run from its checkpoint")
    pl.set_defaults(func=_cmd_pipeline)
    g = sub.add_parser("grid", help="the evidence grid: StepNFT, controls and GRPO over starts and seeds")
    g.add_argument("--spec", required=True, help="grid YAML (configs/grids/pickcube.yaml)")
    g.add_argument("--only", action="append", default=[], metavar="RUN", help="run only this run id (repeatable)")
    g.add_argument("--force", action="store_true", help="rerun runs whose result file exists")
    g.add_argument("--list", action="store_true", help="list the runs and whether each has finished")
    g.add_argument("--summarize", action="store_true",
                   help="only rebuild summary.json and the plot (after copying reusable runs: reuse_results)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g.set_defaults(func=_cmd_grid)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastnft`` console script."""
    args = build_parser().parse_args(argv)
    with friendly_errors():
        args.func(args)
    from fastnft.engine import dist as fdist  # after the command: its own imports stay lazy

    fdist.shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
