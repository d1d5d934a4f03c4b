"""Success-rate evaluation (deterministic Euler ODE sampling, SPEC S2c), reports and plots.

    fastnft eval --config configs/pickcube_stepnft.yaml --run runs/pickcube_stepnft   # or --policy FILE
"""

from __future__ import annotations

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
    "diff_interval",
    "evaluate_policy",
    "paired_diff_interval",
    "format_table",
    "plot_success_curves",
]


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

    The sampler noise of each round of ``env.num_envs`` episodes comes from a generator seeded by ``seed`` and
    the round's first episode seed. So two policies evaluated on the same seeds see the same initial states AND
    the same initial noise at each policy call, and their per-episode outcomes can be compared pairwise
    (:func:`paired_diff_interval`), which is far tighter than comparing two independent success rates. The
    pairing holds for evaluations with the same world size, ``env.num_envs`` and device type (they decide which
    seeds open a round).

    Returns:
        ``{"success_rate", "successes", "episodes", "ci_low", "ci_high" (95 % Wilson), "mean_steps",
        "per_episode": [0/1 per episode, in seed order, all ranks]}``.
    """
    sch = flow_sde_schedule(num_steps, 0.0)
    succ: list[torch.Tensor] = []
    steps_sum = 0
    N = env.num_envs
    for k in range(0, len(seeds), N):
        gen = make_generator(device, seed * 1_000_003 + seeds[k])
        _, st = run_episodes(policy, env, sch, seeds[k:k + N], stochastic=False, record=False, generator=gen,
                             device=device)
        succ.append(st.episode_success.to(torch.long))
        steps_sum += int(st.episode_steps.sum())
    mine = torch.cat(succ).tolist() if succ else []
    gathered = fdist.all_gather_object(mine)
    # ranks hold seeds j % world == rank: interleave back to seed order
    per_episode = [gathered[j % len(gathered)][j // len(gathered)] for j in range(sum(len(g) for g in gathered))]
    counts = torch.tensor([sum(mine), len(mine), steps_sum], dtype=torch.float64)
    counts = fdist.all_reduce(counts, tdist.ReduceOp.SUM if tdist.is_available() else None)
    s, n, steps = (int(c) for c in counts.tolist())
    lo, hi = wilson_interval(s, n)
    return {"success_rate": s / max(n, 1), "successes": s, "episodes": n, "ci_low": lo, "ci_high": hi,
            "mean_steps": steps / max(n, 1), "per_episode": per_episode}


def paired_diff_interval(before: list[float], after: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """Mean per-episode difference ``after - before`` of two evaluations on the SAME episodes, with a 95 % interval.

    Both lists hold outcomes in [0, 1] in the same seed order (``evaluate_policy(...)["per_episode"]``, or their
    mean over several runs). The interval is
    the normal approximation ``mean(d) +- z * sd(d) / sqrt(n)`` of the paired differences ``d_j in {-1, 0, 1}``;
    episodes whose outcome did not change contribute no variance.

    Returns:
        ``(difference, low, high)`` as fractions.

    Raises:
        ValueError: the lists differ in length or are empty.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired_diff_interval needs two equally long, non-empty outcome lists, got "
                         f"{len(before)} and {len(after)}; evaluate both policies on the same seeds")
    d = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    n = d.numel()
    m = float(d.mean())
    sd = float(d.std(unbiased=True)) if n > 1 else 0.0
    h = z * sd / n ** 0.5
    return m, m - h, m + h


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
