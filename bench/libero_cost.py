"""LIBERO's cost per env process on this machine: resident memory (RSS) of a worker and CPU time of its episode
starts and steps, with two cameras at the paper's 256 px and state-only. Writes ``results/libero_cost.json``.

    PYTHONPATH=$PWD python bench/libero_cost.py                  # ~3 minutes on 2 busy CPU cores
    PYTHONPATH=$PWD python bench/libero_cost.py --steps 20 --out results/libero_cost.json

Memory is read from ``/proc/<pid>/status`` (``VmRSS`` now, ``VmHWM`` peak) of the worker process after the sim is
built and stepped; the parent process (torch, the policy) is not counted. Times are the worker's CPU time
(``/proc/<pid>/stat`` utime + stime), which does not depend on what else the machine runs, and wall time, which
does (the load average is recorded next to it). The envs needed per RAM budget follow from the peak RSS.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

from fastnft.atomic import write_json_atomic
from fastnft.config import EnvConfig
from fastnft.envs.libero import LiberoVectorEnv
from fastnft.envs.libero_suites import seed_for_episode

_TICK = os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / _TICK  # utime, stime (fields 14, 15)


def measure(cameras: list[str], image_size: int, steps: int) -> dict:
    cfg = EnvConfig(task="libero_object", obs_mode="rgb" if cameras else "state", cameras=cameras or ["agentview"],
                    image_size=image_size, max_episode_steps=10_000)
    env = LiberoVectorEnv(cfg, num_envs=1)
    try:
        pid = env.worker_pids()[0]
        out: dict = {"cameras": cameras, "image_size": image_size if cameras else None}
        seed_a, seed_b = seed_for_episode(0, 0, 0), seed_for_episode(0, 1, 0)
        c0, w0 = _cpu_s(pid), time.perf_counter()
        env.reset([seed_a])  # builds the sim (a new task): LIBERO's hard reset, + 15 settling steps
        out["first_reset_cpu_s"], out["first_reset_wall_s"] = _cpu_s(pid) - c0, time.perf_counter() - w0
        c0, w0 = _cpu_s(pid), time.perf_counter()
        env.reset([seed_b])  # same task: soft reset + init state + 15 settling steps
        out["same_task_reset_cpu_s"], out["same_task_reset_wall_s"] = _cpu_s(pid) - c0, time.perf_counter() - w0
        act = torch.zeros(1, 7)
        act[0, 6] = -1.0
        c0, w0 = _cpu_s(pid), time.perf_counter()
        for _ in range(steps):
            env.step(act)
        out["step_cpu_ms"] = 1000 * (_cpu_s(pid) - c0) / steps
        out["step_wall_ms"] = 1000 * (time.perf_counter() - w0) / steps
        out["worker_rss_mib"] = _status_kib(pid, "VmRSS") / 1024
        out["worker_peak_rss_mib"] = _status_kib(pid, "VmHWM") / 1024
        out["worker_imports_torch"] = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    finally:
        env.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="results/libero_cost.json")
    args = p.parse_args()
    rows = [measure(["agentview", "wrist"], 256, args.steps), measure([], 256, args.steps)]
    cam = rows[0]
    gib = cam["worker_peak_rss_mib"] / 1024
    limits = {"libero_spatial": 240, "libero_object": 240, "libero_goal": 320, "libero_10": 480}
    result = {
        "what": "LIBERO cost per env worker process (libero_object, task 0): RSS and CPU time per episode start "
                "and env step; bench/libero_cost.py",
        "machine": {"cpus": os.cpu_count(), "load_avg_1min_at_end": os.getloadavg()[0], "python": platform.python_version(),
                    "renderer": os.environ.get("MUJOCO_GL", "egl") + " (Mesa llvmpipe, CPU)"},
        "versions": {d: metadata.version(d) for d in ("mujoco", "robosuite", "rlinf-libero")},
        "steps_timed": args.steps,
        "rows": rows,
        "envs_per_64_gib": int(64 // gib), "envs_per_128_gib": int(128 // gib), "envs_per_256_gib": int(256 // gib),
        "worker_peak_rss_gib_two_cameras_256px": gib,
        "rollout_epoch_cpu_s_per_env": {s: cam["same_task_reset_cpu_s"] + n * cam["step_cpu_ms"] / 1000
                                         for s, n in limits.items()},
        "note": "rollout_epoch_cpu_s_per_env = one full-length episode (all limit steps, no early success) of one "
                "env on CPU rendering, simulator only (the policy's cost is not included); the same-task reset "
                "is the common case, a task switch costs first_reset_cpu_s instead.",
    }
    write_json_atomic(args.out, result)
    print(result)


if __name__ == "__main__":
    main()
