"""The rollout ceiling, measured beside fastnft in one run: raw PickCube-v1 steps/s against fastnft's rollout.

    python bench/rollout_ceiling.py --json bench/rollout_ceiling.json            # full run (~10 min on 2 cores)
    python bench/rollout_ceiling.py --episodes 8 --seconds 3 --workers 1 --json /tmp/rc.json   # smoke run
    python bench/rollout_ceiling.py --policy runs/sft/policy.pt                  # an SFT policy instead of random init

One invocation, on one machine:

(a) **raw**: one ManiSkill PickCube-v1 env built as the embedded default builds it (``configs/pickcube_stepnft.yaml``:
    state observations, ``pd_ee_delta_pos``, 100-step episodes, ``physx_cpu``, no renderer, one torch thread),
    stepped with pre-drawn uniform numpy actions in a tight loop in one process (no policy, no IPC), reset with
    seeds 0, 1, 2, ... at every episode end. ``--repeats`` loops of ``--seconds`` before the rollouts and as many
    after them (the load of a shared machine moves); r uses the median of all, ``r_range`` their min and max.
    PhysX's share is the time inside ``ManiSkillScene.step`` (``px.step()``, 5 physics substeps per env step) over
    the loop's wall time.
(b) **fastnft**: ``fastnft.loop.rollout.run_episodes`` as the trainer calls it (stochastic, recording, the default
    NFT config, ``StepNFTTrainer.train_seeds`` with groups of 8), for the tree at ``--before`` (a temporary git
    worktree, removed at the end) and for the tree this script lives in ("after"). Each setting runs in its own
    subprocess with ``PYTHONPATH`` at its tree: build env and policy, one warm-up call (one round), then calls of
    ``--episodes`` episodes (iterations 1, 2, ...) until ``--seconds`` have passed.

Worker settings (``--workers 1,2,default``). A tree without ``env.num_workers`` (the old rollout) runs one process
per env, so "workers" is ``env.num_envs`` (``default`` = the config's, 8). A tree with ``env.num_workers`` (the
worker pool) runs the config's ``env.num_envs`` with ``num_workers`` 1, 2 and null (= its default), plus the default
worker count at twice the env slots.

Steps are counted twice: ``env_steps`` are the steps episodes use (``RolloutStats.env_steps``); ``sim_steps`` are
every simulated step. The old CPU env steps all N envs on every ``VectorEnv.step`` call, ended episodes included, so
there ``sim_steps = N x step calls`` (counted by wrapping the env's ``_step``); a tree whose ``RolloutStats`` has
``sim_steps`` reports its own.

    r = used env-steps/s / (min(cores, workers) x raw steps/s)

Goal of issue "Episodes per minute": r >= 0.8 on 2 cores. The machine this runs on may be shared: the JSON records
the load average before and after; timings are in this JSON, never in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pickcube_stepnft.yaml"
GROUP_SIZE = 8


# ---------------------------------------------------------------------------------------------------------------------
# Child side: runs with PYTHONPATH at the measured tree (imports fastnft from there)
# ---------------------------------------------------------------------------------------------------------------------
def _check_tree(tree: str) -> str:
    import fastnft

    got = Path(fastnft.__file__).resolve()
    if Path(tree).resolve() not in got.parents:
        raise RuntimeError(f"fastnft imported from {got}, not from the tree {tree}: PYTHONPATH is not first")
    return str(got)


def _child_probe(spec: dict) -> dict:
    """Which rollout API the tree has, and its config's defaults."""
    import dataclasses

    from fastnft.config import EnvConfig, load_config
    from fastnft.loop.rollout import RolloutStats

    cfg = load_config(Path(spec["tree"]) / CONFIG, ["device=cpu"])
    env_fields = {f.name for f in dataclasses.fields(EnvConfig)}
    stat_fields = {f.name for f in dataclasses.fields(RolloutStats)}
    return {"fastnft_file": _check_tree(spec["tree"]), "has_num_workers": "num_workers" in env_fields,
            "has_sim_steps": "sim_steps" in stat_fields, "default_num_envs": cfg.env.num_envs,
            "default_num_workers": getattr(cfg.env, "num_workers", None)}


def _child_raw(spec: dict) -> dict:
    """(a): one PickCube env in a tight loop in this process; PhysX's ``scene.step`` timed by a class-level wrapper."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    import gymnasium as gym
    import mani_skill
    import mani_skill.envs
    from mani_skill.envs.scene import ManiSkillScene

    from fastnft.config import load_config

    _check_tree(spec["tree"])
    cfg = load_config(Path(spec["tree"]) / CONFIG, ["device=cpu"]).env
    kwargs = {"obs_mode": cfg.obs_mode, "control_mode": cfg.control_mode, "max_episode_steps": cfg.max_episode_steps,
              "render_mode": None, "render_backend": "none"}
    env = gym.make(cfg.task, sim_backend="physx_cpu", num_envs=1, **kwargs)
    base = env.unwrapped
    clock = {"t": 0.0, "n": 0}
    real_step = ManiSkillScene.step

    def timed_step(self):  # ManiSkillScene.step is `self.px.step()` (mani_skill/envs/scene.py)
        t = time.perf_counter()
        real_step(self)
        clock["t"] += time.perf_counter() - t
        clock["n"] += 1

    ManiSkillScene.step = timed_step
    space = base.single_action_space
    acts = np.random.default_rng(0).uniform(space.low, space.high, (4096, *space.shape)).astype(np.float32)
    seed = 0
    env.reset(seed=seed)
    for i in range(200):  # warm-up
        env.step(acts[i])
    seed += 1
    env.reset(seed=seed)
    repeats = []
    k = 0
    for _ in range(spec["repeats"]):
        clock["t"], clock["n"] = 0.0, 0
        n = episodes = 0
        t_reset = 0.0
        t0 = time.perf_counter()
        while True:
            _, _, term, trunc, _ = env.step(acts[k & 4095])
            k += 1
            n += 1
            if bool(term) or bool(trunc):
                tr = time.perf_counter()
                seed += 1
                episodes += 1
                env.reset(seed=seed)
                t_reset += time.perf_counter() - tr
            if n % 50 == 0 and time.perf_counter() - t0 >= spec["seconds"]:
                break
        wall = time.perf_counter() - t0
        repeats.append({"steps": n, "episodes_ended": episodes, "seconds": wall, "steps_per_s": n / wall,
                        "physx_seconds": clock["t"], "physx_share": clock["t"] / wall, "physx_calls": clock["n"],
                        "reset_share": t_reset / wall})
    ManiSkillScene.step = real_step
    env.close()
    rates = sorted(r["steps_per_s"] for r in repeats)
    med = statistics.median(rates)
    return {"env": {"task": cfg.task, "sim_backend": "physx_cpu", "num_envs": 1, **kwargs},
            "physx_substeps_per_env_step": repeats[0]["physx_calls"] / repeats[0]["steps"],
            "mani_skill": mani_skill.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "steps_per_s_median": med, "steps_per_s_min": rates[0], "steps_per_s_max": rates[-1],
            "spread": (rates[-1] - rates[0]) / med,
            "physx_share_median": statistics.median(r["physx_share"] for r in repeats),
            "repeats": repeats}


def _child_rollout(spec: dict) -> dict:
    """(b): ``run_episodes`` as ``StepNFTTrainer.iteration`` calls it, timed after one warm-up round."""
    import dataclasses

    import torch

    from fastnft.config import EnvConfig, load_config
    from fastnft.devices import make_generator
    from fastnft.envs import make_env
    from fastnft.kernels import get_sde_step
    from fastnft.loop.rollout import RolloutStats, run_episodes
    from fastnft.profiling import PhaseTimers
    from fastnft.sde import flow_sde_schedule

    fastnft_file = _check_tree(spec["tree"])
    new_api = "num_workers" in {f.name for f in dataclasses.fields(EnvConfig)}
    has_sim = "sim_steps" in {f.name for f in dataclasses.fields(RolloutStats)}
    overrides = ["device=cpu", f"env.num_envs={spec['num_envs']}"]
    if new_api:
        overrides.append(f"env.num_workers={'null' if spec['num_workers'] is None else spec['num_workers']}")
    elif spec.get("num_workers") is not None:
        raise ValueError("this tree has no env.num_workers; give num_envs only")
    cfg = load_config(Path(spec["tree"]) / CONFIG, overrides)
    device = torch.device("cpu")
    t_build = time.perf_counter()
    env = make_env(cfg.env)
    try:
        t_build = time.perf_counter() - t_build
        if spec["policy"]:
            from fastnft.policies.io import load_policy

            policy, _ = load_policy(spec["policy"], cfg)
        else:
            from fastnft.policies.state_flow import StateFlowPolicy

            torch.manual_seed(0)
            policy = StateFlowPolicy(env.obs_dim, env.act_dim, cfg.policy)
        policy.set_precision(cfg.engine.dtype)
        policy.to(device).eval()
        noise = cfg.nft.noise_level if cfg.nft.rollout == "sde" else 0.0
        sch = flow_sde_schedule(cfg.policy.num_steps, noise).to(device=device, dtype=torch.float32)
        step_fn = get_sde_step(cfg.engine.kernels, device)
        gen = make_generator(device, cfg.train.seed * 1000)
        try:
            from fastnft.loop.graphs import GraphedSampler

            sampler = GraphedSampler(policy, cfg.rollout.cuda_graphs)
        except ImportError:
            sampler = None
        E, G = spec["episodes"], GROUP_SIZE

        def seeds(it: int, n: int) -> list[int]:  # StepNFTTrainer.train_seeds, one rank
            base = cfg.env.train_seed + it * (n // G)
            return [base + j // G for j in range(n)]

        step_calls = [0]
        # (a pool's _step may skip ended envs: N x calls holds only for the old one-process-per-env API)
        count_calls = not new_api and not has_sim and hasattr(env, "_step")
        if count_calls:  # old CPU env: every VectorEnv.step steps all N envs, ended episodes included
            real = env._step

            def counted(actions):
                step_calls[0] += 1
                return real(actions)

            env._step = counted

        def call(it: int, n: int, g: int = G) -> RolloutStats:
            _, st = run_episodes(policy, env, sch, seeds(it, n), stochastic=True, record=True, generator=gen,
                                 nft=cfg.nft, step_fn=step_fn, timers=PhaseTimers(), device=device, group_size=g,
                                 sampler=sampler)
            return st

        t_warm = time.perf_counter()
        call(0, cfg.env.num_envs, 1)  # warm-up: one round of the env slots (groups of 1: labels unused)
        t_warm = time.perf_counter() - t_warm
        step_calls[0] = 0
        tot = {"calls": 0, "episodes": 0, "successes": 0, "env_steps": 0, "sim_steps": 0, "policy_calls": 0}
        phase: dict[str, float] = {}
        secs = 0.0
        it = 1
        while tot["calls"] == 0 or secs < spec["seconds"]:
            t0 = time.perf_counter()
            st = call(it, E)
            secs += time.perf_counter() - t0
            it += 1
            tot["calls"] += 1
            for k in ("episodes", "successes", "env_steps", "policy_calls"):
                tot[k] += int(getattr(st, k))
            if has_sim:
                tot["sim_steps"] += int(st.sim_steps)
            for k, v in (st.time or {}).items():
                phase[k] = phase.get(k, 0.0) + float(v)
        if count_calls:
            tot["sim_steps"] = step_calls[0] * env.num_envs
        elif not has_sim:
            tot["sim_steps"] = None
        workers = getattr(env, "num_workers", None) if new_api else env.num_envs
        if workers is None:  # new API without the attribute: its documented default
            workers = cfg.env.num_workers or min(cfg.env.num_envs, len(os.sched_getaffinity(0)))
        out = {"api": "worker pool (env.num_workers)" if new_api else "one process per env (env.num_envs)",
               "fastnft_file": fastnft_file, "num_envs": cfg.env.num_envs,
               "num_workers_config": getattr(cfg.env, "num_workers", None), "workers": int(workers),
               "policy": spec["policy"] or "random init (torch.manual_seed(0))",
               "sim_steps_source": ("RolloutStats.sim_steps" if has_sim else
                                    "num_envs x VectorEnv._step calls" if count_calls else "unavailable"),
               "env_build_seconds": t_build, "warmup_seconds": t_warm, "seconds": secs, **tot,
               "success_rate": tot["successes"] / max(tot["episodes"], 1),
               "env_steps_per_s": tot["env_steps"] / secs,
               "sim_steps_per_s": None if tot["sim_steps"] is None else tot["sim_steps"] / secs,
               "episodes_per_min": 60.0 * tot["episodes"] / secs, "phase_seconds": phase}
        sample = phase.get("time/rollout/sample")
        out["policy_share"] = sample / secs if sample is not None else None
        return out
    finally:
        env.close()


def _child_main(mode: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    fn = {"probe": _child_probe, "raw": _child_raw, "rollout": _child_rollout}[mode]
    print("RESULT " + json.dumps(fn(spec)), flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Parent side: no fastnft / torch imports
# ---------------------------------------------------------------------------------------------------------------------
def _run_child(mode: str, spec: dict, tree: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_child", mode, json.dumps(spec)],
                         capture_output=True, text=True, env=env, cwd=str(tree), timeout=timeout, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = "\n".join((out.stdout + out.stderr).strip().splitlines()[-25:])
        raise RuntimeError(f"{mode} child for {tree} failed (rc {out.returncode}):\n{tail}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["child_wall_seconds"] = time.perf_counter() - t0
    return res


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


@contextlib.contextmanager
def _worktree(rev: str):
    """A detached temporary worktree of ``rev``; removed on exit, also on error."""
    path = Path(tempfile.mkdtemp(prefix="rollout_ceiling_before_"))
    path.rmdir()
    _git("worktree", "add", "--detach", str(path), rev)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True, check=False)


def _settings(probe: dict, workers: list[str]) -> list[dict]:
    """The (num_envs, num_workers) runs of one tree for the requested worker tokens (see the module docstring)."""
    n_def = probe["default_num_envs"]
    if not probe["has_num_workers"]:
        return [{"label": f"workers={w}", "num_envs": n_def if w == "default" else int(w), "num_workers": None}
                for w in workers]
    runs = [{"label": f"workers={w}", "num_envs": n_def, "num_workers": None if w == "default" else int(w)}
            for w in workers]
    if "default" in workers:
        runs.append({"label": f"workers=default,num_envs={2 * n_def}", "num_envs": 2 * n_def, "num_workers": None})
    return runs


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=str(REPO / "bench" / "rollout_ceiling.json"), help="output JSON path")
    ap.add_argument("--seconds", type=float, default=10.0,
                    help="seconds per measurement: each raw repeat, and the least timed rollout time per setting")
    ap.add_argument("--repeats", type=int, default=3, help="raw-loop repeats (their spread is reported)")
    ap.add_argument("--episodes", type=int, default=64, help="episodes per run_episodes call (a multiple of 8)")
    ap.add_argument("--before", default="fb1b08c", help="git revision of the 'before' tree")
    ap.add_argument("--workers", default="1,2,default", help="comma-separated worker counts; 'default' = the config's")
    ap.add_argument("--policy", default=None, help="SFT policy file (state_flow); default: a random-init policy")
    ap.add_argument("--no-before", action="store_true", help="skip the --before tree (after only)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child process")
    ap.add_argument("--_child", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child_main(*args._child)
        return 0
    if args.episodes < GROUP_SIZE or args.episodes % GROUP_SIZE:
        ap.error(f"--episodes must be a positive multiple of the group size {GROUP_SIZE}")
    workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    for w in workers:
        if w != "default" and not (w.isdigit() and int(w) >= 1):
            ap.error(f"--workers: {w!r} is neither a count >= 1 nor 'default'")
    policy = str(Path(args.policy).resolve()) if args.policy else None
    cores = len(os.sched_getaffinity(0))
    t_start = time.perf_counter()
    report: dict = {
        "benchmark": "rollout_ceiling", "command": " ".join(["python", "bench/rollout_ceiling.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": cores, "cpu_model": _cpu_model(), "hostname": platform.node(),
                    "python": platform.python_version(), "load_average_before": os.getloadavg()},
        "args": {k: v for k, v in vars(args).items() if k != "_child"},
        "r_definition": "used env-steps/s / (min(cores, workers) x raw steps/s)"}
    after_rev = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))

    def raw_run(when: str) -> dict:
        print(f"raw ({when}): one PickCube-v1 env, {args.repeats} x {args.seconds:g} s ...", flush=True)
        res = _run_child("raw", {"tree": str(REPO), "seconds": args.seconds, "repeats": args.repeats}, REPO,
                         args.timeout)
        print(f"  {res['steps_per_s_median']:.0f} steps/s (min {res['steps_per_s_min']:.0f}, max "
              f"{res['steps_per_s_max']:.0f}), PhysX scene.step {100 * res['physx_share_median']:.0f} %", flush=True)
        return res

    def measure(name: str, tree: Path, rev: str, dirty_tree: bool) -> dict:
        probe = _run_child("probe", {"tree": str(tree)}, tree, args.timeout)
        section = {"tree": str(tree), "rev": rev, "uncommitted_changes": dirty_tree, "api": probe, "runs": []}
        for s in _settings(probe, workers):
            print(f"{name}: {s['label']} (num_envs {s['num_envs']}) ...", flush=True)
            spec = {"tree": str(tree), "num_envs": s["num_envs"], "num_workers": s["num_workers"],
                    "episodes": args.episodes, "seconds": args.seconds, "policy": policy}
            res = _run_child("rollout", spec, tree, args.timeout)
            res["label"] = s["label"]
            section["runs"].append(res)
            sim = "?" if res["sim_steps_per_s"] is None else f"{res['sim_steps_per_s']:.0f}"
            print(f"  {res['env_steps_per_s']:.0f} used env-steps/s, {sim} simulated/s ({res['workers']} workers)",
                  flush=True)
        return section

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The raw loop brackets the rollouts (start and end): on a shared machine the load moves during a run.
        raw_start = raw_run("start")
        report["machine"].update(torch=raw_start["torch"], mani_skill=raw_start["mani_skill"])
        if not args.no_before:
            with _worktree(args.before) as tree:
                report["before"] = measure("before", tree, _git("rev-parse", "HEAD", cwd=tree), False)
        report["after"] = measure("after", REPO, after_rev, dirty)
        raw_end = raw_run("end")
        rates = [x["steps_per_s"] for x in raw_start["repeats"] + raw_end["repeats"]]
        raw_rate = statistics.median(rates)
        report["raw"] = {"steps_per_s_median": raw_rate, "steps_per_s_min": min(rates), "steps_per_s_max": max(rates),
                         "spread": (max(rates) - min(rates)) / raw_rate,
                         "physx_share_median": statistics.median(
                             x["physx_share"] for x in raw_start["repeats"] + raw_end["repeats"]),
                         "start": raw_start, "end": raw_end}
        for name in ("before", "after"):
            for x in report.get(name, {}).get("runs", []):
                w = min(cores, x["workers"])
                x["r"] = x["env_steps_per_s"] / (w * raw_rate)
                x["r_range"] = [x["env_steps_per_s"] / (w * max(rates)), x["env_steps_per_s"] / (w * min(rates))]
                x["r_sim"] = None if x["sim_steps_per_s"] is None else x["sim_steps_per_s"] / (w * raw_rate)
    finally:
        report["machine"]["load_average_after"] = os.getloadavg()
        report["total_seconds"] = time.perf_counter() - t_start
        out.write_text(json.dumps(report, indent=1) + "\n")
    _print_table(report, cores)
    print(f"wrote {args.json}")
    return 0


def _print_table(report: dict, cores: int) -> None:
    raw, m = report["raw"], report["machine"]
    print(f"\ncores {cores}, raw {raw['steps_per_s_median']:.0f} steps/s (min {raw['steps_per_s_min']:.0f}, max "
          f"{raw['steps_per_s_max']:.0f}; start and end), PhysX scene.step {100 * raw['physx_share_median']:.0f} % of "
          f"it; load average before {[round(v, 2) for v in m['load_average_before']]}, after "
          f"{[round(v, 2) for v in m['load_average_after']]}")
    hdr = ("tree", "setting", "envs", "workers", "episodes", "used/s", "sim/s", "policy %", "ep/min", "r",
           "r range")
    print("| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
    for name in ("before", "after"):
        for x in report.get(name, {}).get("runs", []):
            pol = "-" if x["policy_share"] is None else f"{100 * x['policy_share']:.0f}"
            sim = "?" if x["sim_steps_per_s"] is None else f"{x['sim_steps_per_s']:.0f}"
            print(f"| {name} {report[name]['rev'][:7]} | {x['label']} | {x['num_envs']} | {x['workers']} | "
                  f"{x['episodes']} | {x['env_steps_per_s']:.0f} | {sim} | {pol} | "
                  f"{x['episodes_per_min']:.0f} | {x['r']:.3f} | {x['r_range'][0]:.2f}-{x['r_range'][1]:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
