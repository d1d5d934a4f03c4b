"""Success-rate evaluation: held-out episodes with deterministic Euler ODE sampling (SPEC S2c), summed over ranks.

Intervals, tables and plots of the results are in :mod:`fastnft.report`.

    fastnft eval --config configs/pickcube_stepnft.yaml --run runs/pickcube_stepnft   # or --policy FILE
"""

from __future__ import annotations

import torch
import torch.distributed as tdist

from fastnft.devices import make_generator
from fastnft.engine import dist as fdist
from fastnft.envs.base import VectorEnv
from fastnft.loop.rollout import run_episodes
from fastnft.policies.base import FlowPolicy
from fastnft.report import wilson_interval
from fastnft.sde import flow_sde_schedule

__all__ = ["evaluate_policy"]


def evaluate_policy(policy: FlowPolicy, env: VectorEnv, seeds: list[int], num_steps: int, *,
                    device: torch.device | str = "cpu", seed: int = 0) -> dict[str, float]:
    """Success rate of ``policy`` with deterministic Euler ODE sampling (S2c) on ``seeds`` (this rank's share),
    summed over ranks.

    Args:
        policy: the policy to evaluate (eval mode is set here).
        env: vector env (its slots take the episodes from a queue).
        seeds: held-out episode seeds of this rank.
        num_steps: K denoising steps.
        device: the policy's device; the sampler noise is drawn there.
        seed: seed of the initial sampler noise (fixed so that evaluation is repeatable on one device type).

    Every episode draws its initial sampler noise from its own generator, keyed by ``seed`` and the episode's place
    in ``seeds`` (:func:`fastnft.loop.rollout.run_episodes`). So two policies evaluated on the same seeds see the same
    initial states AND the same initial noise in each episode, whatever the number of envs or workers, and their
    per-episode outcomes can be compared pairwise (:func:`fastnft.report.paired_diff_interval`), which is far tighter
    than comparing two independent success rates. The pairing holds for evaluations with the same world size and
    device type.

    Returns:
        ``{"success_rate", "successes", "episodes", "ci_low", "ci_high" (95 % Wilson), "mean_steps",
        "per_episode": [0/1 per episode, in seed order, all ranks]}``.
    """
    sch = flow_sde_schedule(num_steps, 0.0)
    mine: list[int] = []
    steps_sum = 0
    if seeds:
        _, st = run_episodes(policy, env, sch, seeds, stochastic=False, record=False,
                             generator=make_generator(device, seed), device=device)
        mine = st.episode_success.to(torch.long).tolist()
        steps_sum = int(st.episode_steps.sum())
    gathered = fdist.all_gather_object(mine)
    # ranks hold seeds j % world == rank: interleave back to seed order
    per_episode = [gathered[j % len(gathered)][j // len(gathered)] for j in range(sum(len(g) for g in gathered))]
    counts = torch.tensor([sum(mine), len(mine), steps_sum], dtype=torch.float64)
    counts = fdist.all_reduce(counts, tdist.ReduceOp.SUM if tdist.is_available() else None)
    s, n, steps = (int(c) for c in counts.tolist())
    lo, hi = wilson_interval(s, n)
    return {"success_rate": s / max(n, 1), "successes": s, "episodes": n, "ci_low": lo, "ci_high": hi,
            "mean_steps": steps / max(n, 1), "per_episode": per_episode}
