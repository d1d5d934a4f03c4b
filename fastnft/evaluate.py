"""Success-rate evaluation (deterministic Euler ODE sampling, SPEC S2c), reports and plots.

    fastnft eval --config configs/pickcube_stepnft.yaml --run runs/pickcube_stepnft   # or --policy FILE
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from fastnft.devices import make_generator
from fastnft.engine import dist as fdist
from fastnft.envs.base import VectorEnv
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.rollout import run_episodes, wilson_interval
from fastnft.sde import flow_sde_schedule

__all__ = [
    "all_reduce",
    "diff_interval",
    "evaluate_policy",
    "format_table",
    "plot_success_curves",
    "write_json_atomic",
]


def all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """All-reduce of ``t`` over ranks (identity with one rank); returns the result on ``t``'s device and dtype.

    The collective runs on a copy on :func:`fastnft.engine.dist.collective_device` (CUDA for an NCCL group, CPU for
    gloo), so callers may pass tensors of any device.
    """
    if fdist.is_initialized() and fdist.world_size() > 1:
        work = t.to(fdist.collective_device())
        tdist.all_reduce(work, op=op)
        return work.to(t.device)
    return t


def evaluate_policy(policy: StateFlowPolicy, env: VectorEnv, seeds: list[int], num_steps: int, *,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Success rate of ``policy`` with deterministic Euler ODE sampling (S2c) on ``seeds`` (this rank's share),
    summed over ranks.

    Args:
        policy: the policy to evaluate (eval mode is set here).
        env: vector env (reset per round of ``num_envs`` episodes).
        seeds: held-out episode seeds of this rank.
        num_steps: K denoising steps.
        device: the policy's device; the sampler noise is drawn there.
        seed: seed of the initial sampler noise (fixed so that evaluation is repeatable on one device type).

    Returns:
        ``{"success_rate", "successes", "episodes", "ci_low", "ci_high" (95 % Wilson), "mean_steps"}``.
    """
    sch = flow_sde_schedule(num_steps, 0.0)
    gen = make_generator(device, seed)
    if seeds:
        _, st = run_episodes(policy, env, sch, seeds, stochastic=False, record=False, generator=gen, device=device)
        counts = torch.tensor([st.successes, st.episodes, int(st.episode_steps.sum())], dtype=torch.float64)
    else:
        counts = torch.zeros(3, dtype=torch.float64)
    counts = all_reduce(counts, tdist.ReduceOp.SUM if tdist.is_available() else None)
    s, n, steps = (int(c) for c in counts.tolist())
    lo, hi = wilson_interval(s, n)
    return {"success_rate": s / max(n, 1), "successes": s, "episodes": n, "ci_low": lo, "ci_high": hi,
            "mean_steps": steps / max(n, 1)}


def diff_interval(s1: int, n1: int, s2: int, n2: int, z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two success rates ``p2 - p1`` with a 95 % Newcombe (Wilson-based) interval.

    Returns:
        ``(difference, low, high)``.
    """
    p1, p2 = s1 / max(n1, 1), s2 / max(n2, 1)
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p2 - p1
    lo = d - ((p2 - l2) ** 2 + (u1 - p1) ** 2) ** 0.5
    hi = d + ((u2 - p2) ** 2 + (p1 - l1) ** 2) ** 0.5
    return d, lo, hi


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON through a temp file + fsync + rename, so a kill never leaves a torn report."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=p.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    return p


def plot_success_curves(curves: dict[str, list[dict[str, float]]], path: str | Path, title: str) -> Path:
    """Held-out success rate vs iteration (with 95 % intervals) for one or more runs, saved as PNG.

    Args:
        curves: ``{label: [{"iteration", "success_rate", "ci_low", "ci_high"}, ...]}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for label, hist in curves.items():
        if not hist:
            continue
        it = [h["iteration"] for h in hist]
        sr = [100 * h["success_rate"] for h in hist]
        ax.plot(it, sr, marker="o", ms=3, label=label)
        ax.fill_between(it, [100 * h["ci_low"] for h in hist], [100 * h["ci_high"] for h in hist], alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out success rate (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``columns = [(key, header)]``; floats get 3 decimals."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
