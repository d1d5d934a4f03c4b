"""What the per-iteration diagnostics cost, as a share of an iteration: today's schedule (gradient signal on every
iteration, ``train.diagnostics_every=1``) against the default (``train.diagnostics_every``), in ONE run of this
script on the same machine. Writes ``bench/diagnostics_cost.json``.

    PYTHONPATH=$PWD python bench/diagnostics_cost.py                       # ~5 minutes on 2 busy CPU cores
    PYTHONPATH=$PWD python bench/diagnostics_cost.py --iterations 50 --out bench/diagnostics_cost.json

The setup is the main job's actor side on the synthetic bandit (no simulator): the embedded default's policy
(configs/pickcube_stepnft.yaml: width 64, depth 2, 4 heads, horizon 8, 5 executed steps, K = 4), its objective
(steps_per_call 4, group baseline over 8 rollouts, micro-batch 512, one update epoch, lr 1e-5) and a buffer of the
main job's size (1024 one-call episodes x 4 solver steps = 4096 rows; the main job's 64 PickCube episodes give up to
64 x 20 calls x 4 = 5120). Both arms run the real trainer (``StepNFTTrainer.iteration``) from the same start.

Times: the trainer's own phase timers (wall clock, ``time/actor/diagnostics``, ``time/actor/loss_diagnostics``,
``perf/iteration_s``) and, because wall time depends on what else the machine runs, the process CPU time of the
same calls (``time.process_time``, all threads). The share is ``diagnostics / iteration`` summed over the run's
iterations. A bandit iteration has almost no simulation, so its share is an UPPER bound of the main job's at the
same diagnostics cost; ``main_job_projection`` spreads the cost per call (the larger of this run's CPU seconds and
issue 21's 3.7 s) over the main job's 120 iterations at the default schedule, adds the loss statistics per
iteration, and divides by a 10 s (after the rollout rewrite) and a 30 s (today) iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import fastnft.loop.trainer as trainer_mod
from fastnft.atomic import write_json_atomic
from fastnft.config import TrainConfig, load_config
from fastnft.envs import make_env
from fastnft.envs.bandit import bandit_demo_dataset
from fastnft.experiments.sft import build_policy
from fastnft.metrics import read_jsonl
from fastnft.policies.state_flow import StateFlowPolicy

MAIN_JOB = {"policy.horizon=8", "policy.n_action_steps=5", "policy.width=64", "policy.depth=2", "policy.heads=4",
            "policy.num_steps=4", "nft.noise_level=0.2", "nft.steps_per_call=4", "nft.baseline=group",
            "nft.max_drift=0.5", "train.group_size=8", "train.micro_batch=512", "train.update_epochs=1",
            "train.lr=1.0e-5"}


class _CPU:
    """Process CPU seconds spent inside wrapped functions, by name."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.process_time() - t
        return timed


def _arm(name: str, cfg, blob, out_dir: Path) -> dict:
    cpu = _CPU()
    cfg = dataclasses.replace(cfg, run_dir=str(out_dir / name))
    mp_targets = {"gradient_signal": trainer_mod.gradient_signal, "loss_diagnostics": trainer_mod.loss_diagnostics}
    trainer = trainer_mod.StepNFTTrainer(cfg, StateFlowPolicy.from_export(blob, cfg.policy), make_env(cfg.env),
                                         progress=False)
    trainer.iteration = cpu.wrap("iteration", trainer.iteration)
    try:
        for k, fn in mp_targets.items():
            setattr(trainer_mod, k, cpu.wrap(k, fn))
        trainer.train()
    finally:
        for k, fn in mp_targets.items():
            setattr(trainer_mod, k, fn)
    rows = [r for r in read_jsonl(out_dir / name / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["iteration"] for r in rows] == list(range(1, cfg.train.iterations + 1)), "one fresh run per arm"
    wall_it = sum(r["perf/iteration_s"] for r in rows)
    wall_gs = sum(r.get("time/actor/diagnostics", 0.0) for r in rows)
    wall_ld = sum(r.get("time/actor/loss_diagnostics", 0.0) for r in rows)
    calls = sum("signal/cos_halves" in r for r in rows)
    return {
        "diagnostics_every": cfg.train.diagnostics_every, "iterations": len(rows), "gradient_signal_calls": calls,
        "buffer_rows_mean": sum(r["rollout/samples"] for r in rows) / len(rows),
        "wall_s": {"iterations": wall_it, "gradient_signal": wall_gs, "loss_diagnostics": wall_ld,
                   "update": sum(r.get("time/actor/update", 0.0) for r in rows),
                   "gradient_signal_per_call": wall_gs / max(calls, 1)},
        "cpu_s": {"iterations": cpu.s["iteration"], "gradient_signal": cpu.s.get("gradient_signal", 0.0),
                  "loss_diagnostics": cpu.s.get("loss_diagnostics", 0.0),
                  "gradient_signal_per_call": cpu.s.get("gradient_signal", 0.0) / max(calls, 1)},
        "share_wall": (wall_gs + wall_ld) / wall_it,
        "share_cpu": (cpu.s.get("gradient_signal", 0.0) + cpu.s.get("loss_diagnostics", 0.0)) / cpu.s["iteration"],
        "share_wall_gradient_signal": wall_gs / wall_it,
        "share_wall_loss_diagnostics": wall_ld / wall_it,
        "logged_perf_diagnostics_share_mean": sum(r["perf/diagnostics_share"] for r in rows) / len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--episodes", type=int, default=1024, help="one-call bandit episodes per iteration")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--out", default="bench/diagnostics_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sets = sorted(MAIN_JOB) + [
        f"train.iterations={args.iterations}", f"train.episodes_per_iter={args.episodes}",
        f"env.num_envs={args.episodes}", "env.max_episode_steps=5", "train.eval_every=0", "train.eval_episodes=64",
        "train.checkpoint_every=100000", "env.eval_seed=100000000"]
    cfg = load_config("configs/bandit_stepnft.yaml", sets)
    data = bandit_demo_dataset(256, cfg.policy.horizon, seed=0)
    blob = build_policy(data, cfg.policy).export()  # untrained: the cost does not depend on the weights
    load0 = os.getloadavg()
    t0 = time.time()
    default_every = TrainConfig().diagnostics_every
    arms = {}
    with tempfile.TemporaryDirectory(prefix="fastnft_diagnostics_cost_") as work:  # fresh run dirs every time
        for name, every in (("before_every_iteration", 1), ("after_default", default_every)):
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, diagnostics_every=every))
            arms[name] = _arm(name, c, blob, Path(work))
    b, a = arms["before_every_iteration"], arms["after_default"]
    per_call_cpu = max(b["cpu_s"]["gradient_signal_per_call"], a["cpu_s"]["gradient_signal_per_call"])
    per_call_wall = max(b["wall_s"]["gradient_signal_per_call"], a["wall_s"]["gradient_signal_per_call"])
    per_call = max(per_call_cpu, 3.7)  # the larger of this run's CPU seconds and issue 21's main-job wall seconds
    main_cfg = TrainConfig(iterations=120)
    main_calls = sum(main_cfg.diagnostics_at(i) for i in range(120))
    ld_per_it = max(a["wall_s"]["loss_diagnostics"], a["cpu_s"]["loss_diagnostics"]) / a["iterations"]
    result = {
        "what": "diagnostics share of an iteration, every iteration (before) vs the default schedule (after), "
                "same run, bandit with the main job's policy, objective and buffer size",
        "command": f"PYTHONPATH=$PWD python bench/diagnostics_cost.py --iterations {args.iterations} "
                   f"--episodes {args.episodes} --threads {args.threads}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                    "shared": "other engineers' jobs ran on the same 2 cores (see loadavg)"},
        "overrides": sets, "arms": arms,
        "share_ratio_after_over_before_wall": a["share_wall"] / b["share_wall"],
        "share_ratio_after_over_before_cpu": a["share_cpu"] / b["share_cpu"],
        "main_job_projection": {
            "what": "amortised diagnostics seconds per iteration of the main job (120 iterations, default "
                    "schedule) over its iteration time; per call: the larger of this run's CPU seconds and issue "
                    "21's 3.7 s; loss statistics: the larger of this run's wall and CPU seconds per iteration",
            "iterations": 120, "gradient_signal_calls": main_calls,
            "gradient_signal_s_per_call": {"cpu_measured_here": per_call_cpu, "wall_measured_here": per_call_wall,
                                           "issue_21_main_job_wall": 3.7, "used": per_call},
            "loss_diagnostics_s_per_iteration": ld_per_it,
            "diagnostics_s_per_iteration": main_calls * per_call / 120 + ld_per_it,
            "share_at_10s_iteration": (main_calls * per_call / 120 + ld_per_it) / 10.0,
            "share_at_30s_iteration": (main_calls * per_call / 120 + ld_per_it) / 30.0,
            "share_at_10s_iteration_every_iteration": (per_call + ld_per_it) / 10.0,
        },
        "wall_s_total": time.time() - t0,
    }
    write_json_atomic(Path(args.out), result)
    print(f"share of an iteration (wall): every iteration {b['share_wall']:.3f} -> default "
          f"(every {default_every}) {a['share_wall']:.3f}; cpu {b['share_cpu']:.3f} -> {a['share_cpu']:.3f}; "
          f"main job at 10 s/iteration: {result['main_job_projection']['share_at_10s_iteration']:.4f}")


if __name__ == "__main__":
    main()
