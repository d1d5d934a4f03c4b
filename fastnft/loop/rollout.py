"""Rollouts with the EMA policy: Flow-SDE sampling, chunked env execution, S3 tuples and S4 labels.

One *round* resets all N envs with fresh seeds and runs until every episode is over; each policy call samples one
action chunk per env and stores, for envs whose episode is still running, the S3 tuple of ``steps_per_call``
solver steps. When the round ends every stored call of an episode gets that episode's label
``y = 2 * success - 1`` (S4). Calls made after an env's episode ended are not stored (S4's mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from fastnft.config import NFTConfig
from fastnft.devices import check_generator
from fastnft.envs.base import VectorEnv
from fastnft.policies.base import FlowPolicy
from fastnft.policies.obs import Obs, obs_cat, obs_index, obs_to
from fastnft.profiling import PhaseTimers
from fastnft.sde import FlowSDESchedule, StepFn

__all__ = ["RolloutBuffer", "RolloutStats", "control_labels", "dense_episode_score", "episode_labels",
           "grpo_advantages", "run_episodes"]


@dataclass
class RolloutBuffer:
    """Training tuples of one iteration (SPEC S3-S4), M rows, on one device.

    Attributes:
        obs: the policy call's observation, M rows: ``[M, obs_dim]`` float32 (state policy), a dict of ``[M, ...]``
            tensors and per-row lists (pi0: frames, state, instruction), or pi0's per-call ``PrefixContext``
            (``prefix_mode: cached``); see :mod:`fastnft.policies.obs`.
        x_t: ``[M, H, D]`` sampler state at the supervised step.
        v_old: ``[M, H, D]`` rollout-policy velocity at that step (stored, never recomputed).
        x_next: ``[M, H, D]`` next sampler state.
        x0: ``[M, H, D]`` final sample of the call (for ``target = x0``).
        step: ``[M]`` int64 supervised solver index i.
        y: ``[M]`` float32 label of the row's episode: in [-1, 1] for StepNFT (S4); for ``algo: grpo`` the
            group-relative advantage of :func:`grpo_advantages` (unbounded, ``|y| <= sqrt(G - 1)``).
        episode: ``[M]`` int64 episode id within the iteration (for diagnostics).
    """

    obs: Obs
    x_t: Tensor
    v_old: Tensor
    x_next: Tensor
    x0: Tensor
    step: Tensor
    y: Tensor
    episode: Tensor

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def index(self, idx: Tensor) -> RolloutBuffer:
        """Rows ``idx`` (a micro-batch)."""
        return RolloutBuffer(**{f.name: obs_index(self.obs, idx) if f.name == "obs" else getattr(self, f.name)[idx]
                                for f in fields(self)})

    def to(self, device: torch.device | str) -> RolloutBuffer:
        """Copy to ``device``."""
        return RolloutBuffer(**{f.name: obs_to(self.obs, device) if f.name == "obs" else getattr(self, f.name).to(device)
                                for f in fields(self)})


@dataclass
class RolloutStats:
    """Counters of one batch of episodes.

    Attributes:
        episodes: finished episodes.
        successes: episodes with success at any step.
        env_steps: env steps executed (active envs only).
        policy_calls: stored policy calls (active envs only).
        episode_success: ``[episodes]`` bool per episode, in seed order.
        episode_steps: ``[episodes]`` int64 env steps per episode.
        episode_score: ``[episodes]`` float32 dense score in [0, 1] per episode (:func:`dense_episode_score`).
        time: seconds per phase (``rollout/sample``, ``env/step``).
    """

    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    policy_calls: int = 0
    episode_success: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    episode_steps: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    episode_score: Tensor = field(default_factory=lambda: torch.zeros(0))
    time: dict = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """successes / episodes (0 when no episode ran)."""
        return self.successes / max(self.episodes, 1)


def dense_episode_score(ret: Tensor, steps: Tensor, success: Tensor, max_steps: int) -> Tensor:
    """Soft episode score r in [0, 1] from a per-step reward in [0, 1] (ManiSkill's ``normalized_dense``), SPEC S4.

    ``r = (sum of rewards + (max_steps - steps) * success) / max_steps``: an episode that succeeds ends there, so
    its remaining steps count at the success reward 1. Success therefore scores highest, earlier success higher,
    and a failure scores by how far it got (reach, grasp, lift). Same formulas as S4's binary score (``y = 2r - 1``
    or ``r - group mean``); it only grades the outcome more finely than one bit.

    Args:
        ret: ``[E]`` float32 summed reward of each episode over its active steps.
        steps: ``[E]`` int64 env steps each episode ran.
        success: ``[E]`` bool success at any step.
        max_steps: the episode length limit.

    Returns:
        ``[E]`` float32, clamped to [0, 1].
    """
    pad = (max_steps - steps).clamp(min=0).float() * success.float()
    return ((ret.float() + pad) / max_steps).clamp(0.0, 1.0)


def episode_labels(success: Tensor, baseline: str = "none", group_size: int = 1) -> Tensor:
    """Per-episode labels y in [-1, 1] (SPEC S4).

    Args:
        success: ``[E]`` bool or float in [0, 1], success of each episode, episodes of one initial state adjacent
            (``group_size`` of them) when ``baseline="group"``.
        baseline: ``none``: ``y = 2s - 1`` (the paper). ``batch``: ``y = s - mean(s)``. ``group``:
            ``y = s - mean over the episode's group``. The baselines are S4 soft scores ``y = 2r' - 1`` with
            ``r' = (1 + s - b) / 2`` in [0, 1]; a group where every rollout agrees gets y = 0 (no ranking signal).
        group_size: rollouts per initial state (``group`` only).

    Returns:
        ``[E]`` float32.

    Raises:
        ValueError: unknown baseline, or ``E`` not a multiple of ``group_size``.
    """
    s = success.float()
    if baseline == "none":
        return 2.0 * s - 1.0
    if baseline == "batch":
        return s - s.mean()
    if baseline == "group":
        if s.numel() % group_size:
            raise ValueError(f"{s.numel()} episodes are not a whole number of groups of {group_size}")
        return s - s.view(-1, group_size).mean(1).repeat_interleave(group_size)
    raise ValueError(f"baseline must be 'none', 'batch' or 'group', got {baseline!r}")


def grpo_advantages(success: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """Group-relative advantages of Flow-GRPO (Liu et al., 2025; ``fastnft.nft`` docstring, G1).

    ``A = (s - mean_G(s)) / (std_G(s) + eps)`` over the G rollouts of one initial state, with the population std
    (so a group of two with one success gets ``A = +-1 / (1 + 2 eps)``). A unanimous group has ``s - mean = 0``
    and gets A = 0 exactly: like S4's group baseline it carries no signal. Unlike S4's labels A is not in
    [-1, 1]; by Samuelson's inequality ``|A| <= sqrt(G - 1)``.

    Args:
        success: ``[E]`` bool or float in [0, 1] per episode; the G episodes of one initial state adjacent (the
            trainer's seed order, see ``StepNFTTrainer.train_seeds``).
        group_size: G >= 2 rollouts per initial state.
        eps: > 0, added to the group std (keeps near-unanimous soft-score groups finite).

    Returns:
        ``[E]`` float32 on ``success``' device.

    Raises:
        ValueError: ``group_size < 2``, ``eps <= 0``, or ``E`` not a multiple of ``group_size``.
    """
    if group_size < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2 rollouts per initial state, got {group_size}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    s = success.float()
    if s.numel() % group_size:
        raise ValueError(f"{s.numel()} episodes are not a whole number of groups of {group_size}")
    g = s.view(-1, group_size)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, unbiased=False, keepdim=True) + eps)
    return adv.reshape(-1)


def control_labels(labels: Tensor, mode: str, generator: torch.Generator) -> Tensor:
    """Per-episode labels of a control run: the real ones, permuted, or zeros.

    Args:
        labels: ``[E]`` float32 per-episode labels from :func:`episode_labels`.
        mode: ``none`` (returned unchanged), ``shuffled`` (a random permutation across the E episodes, drawn
            from ``generator``: the same label distribution with no relation to the injected noise), or ``zero``
            (all 0: the ranking term has no gradient, only the KL term and the EMA move the policy, S7).
        generator: RNG for the permutation (the rollout's generator, so runs stay reproducible).

    Returns:
        ``[E]`` float32 on ``labels``' device.

    Raises:
        ValueError: unknown mode.
    """
    if mode == "none":
        return labels
    if mode == "shuffled":
        check_generator(generator, labels, "label shuffling")
        return labels[torch.randperm(labels.numel(), generator=generator, device=labels.device)]
    if mode == "zero":
        return torch.zeros_like(labels)
    raise ValueError(f"label control must be 'none', 'shuffled' or 'zero', got {mode!r}")


def _choose_steps(n: int, k: int, per_call: int, fixed: int | None, gen: torch.Generator,
                  device: torch.device) -> Tensor:
    """``[n, per_call]`` distinct solver indices per call on ``device`` (S3: uniform, fixed across update epochs)."""
    if fixed is not None:
        return torch.full((n, 1), fixed, dtype=torch.long, device=device)
    check_generator(gen, device, "solver step indices")
    return torch.rand(n, k, generator=gen, device=device).argsort(dim=1)[:, :per_call]


_ROW_KEYS = ("x_t", "v_old", "x_next", "x0", "step", "episode")


def _obs_snapshot(obs: Obs) -> Obs:
    """A copy of a call's observation that later env steps cannot overwrite (a GPU simulator may reuse its
    buffers); no host sync. Strings and lists are kept as they are (the env builds new ones per step)."""
    if isinstance(obs, Tensor):
        return obs.clone()
    if isinstance(obs, dict):
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in obs.items()}
    return obs  # a per-call context (pi0's cached prefix): built fresh by each encode


def _compact_round(rnd: dict[str, list], rows: dict[str, list]) -> None:
    """Append the kept rows of one round (full ``[N]`` rows per stored solver step, ``keep`` their mask) to
    ``rows``: one boolean selection for the round (plus one ``tolist`` when the observation holds lists)."""
    keep = torch.cat(rnd["keep"])
    idx = torch.arange(keep.numel(), device=keep.device)[keep]  # the round's one sync (a mask, as fake CUDA expects)
    for k in _ROW_KEYS:
        rows[k].append(torch.cat(rnd[k]).index_select(0, idx))
    rows["obs"].append(obs_index(obs_cat(rnd["call_obs"]), torch.cat(rnd["obs_row"]).index_select(0, idx)))


@torch.no_grad()
def run_episodes(policy: FlowPolicy, env: VectorEnv, schedule: FlowSDESchedule, seeds: list[int], *,
                 stochastic: bool, record: bool, generator: torch.Generator, nft: NFTConfig | None = None,
                 step_fn: StepFn | None = None, timers: PhaseTimers | None = None,
                 device: torch.device | str = "cpu", group_size: int = 1,
                 label_control: str = "none", algo: str = "stepnft", adv_eps: float = 1e-4,
                 sampler=None) -> tuple[RolloutBuffer | None, RolloutStats]:
    """Run one episode per seed (in rounds of ``env.num_envs``) with ``policy``.

    Args:
        policy: the rollout policy (EMA weights, any :class:`~fastnft.policies.base.FlowPolicy`); eval mode. With
            ``policy.stores_context`` (pi0's ``prefix_mode: cached``) the buffer keeps each call's encoded context
            instead of its observation.
        env: the vector env (reused across calls; reset here).
        schedule: K-step Flow-SDE schedule; with ``stochastic=False`` the Euler ODE is used (evaluation).
        seeds: one seed per episode; ``len(seeds)`` need not be a multiple of ``num_envs`` (the last round
            runs extra envs on repeated seeds and discards them).
        stochastic: Flow-SDE sampling (training) or deterministic ODE (evaluation, S2c).
        record: store S3 tuples and S4 labels.
        generator: RNG for noise and step indices, on ``device`` (fastnft.devices' draw rule).
        nft: needed when ``record``: ``steps_per_call`` and ``step`` (random / fixed:j).
        step_fn: SDE step implementation (reference or fused kernel).
        timers: optional phase timers (``rollout/sample``, ``env/step``).
        device: device of the policy and of the returned buffer (env outputs are moved here; a GPU simulator's
            already live here).
        group_size: consecutive seeds that form one group for ``nft.baseline = group`` (S4 labels).
        label_control: ``none`` | ``shuffled`` | ``zero``, see :func:`control_labels` (control experiments).
        algo: ``stepnft`` (S4 labels) or ``grpo`` (``y`` = :func:`grpo_advantages` over groups of
            ``group_size``; the label control then applies to the advantages).
        adv_eps: the advantage's std epsilon (``grpo`` only).
        sampler: object with ``policy.sample``'s signature (``fastnft.loop.graphs.GraphedSampler``: CUDA-graph replays);
            None = ``policy.sample``. Its output is only read (indexed, hence copied) before the next call.

    Returns:
        ``(buffer or None, stats)``.
    """
    if record and nft is None:
        raise ValueError("run_episodes(record=True) needs the NFT config (steps_per_call, step)")
    if algo not in ("stepnft", "grpo"):
        raise ValueError(f"algo must be 'stepnft' or 'grpo', got {algo!r}")
    timers = timers or PhaseTimers()
    was_training = policy.training
    policy.eval()
    N, K, C = env.num_envs, schedule.num_steps, policy.n_action_steps
    per_call = nft.steps_per_call if nft else 1
    fixed = nft.fixed_step() if nft else None
    store_ctx = bool(getattr(policy, "stores_context", False))
    rows: dict[str, list] = {k: [] for k in ("obs", "x_t", "v_old", "x_next", "x0", "step", "episode")}
    ep_success, ep_steps, ep_score = [], [], []
    stats = RolloutStats()
    n_rounds = math.ceil(len(seeds) / N)
    device = torch.device(device)
    sch = schedule.to(device=device, dtype=torch.float32)
    calls = torch.zeros((), dtype=torch.long, device=device)  # summed on the device: no host sync per call
    for r in range(n_rounds):
        round_seeds = seeds[r * N:(r + 1) * N]
        n_real = len(round_seeds)
        round_seeds = round_seeds + [round_seeds[-1]] * (N - n_real)
        with timers.range("env/reset"):
            obs = env.reset(round_seeds)
        steps = torch.zeros(N, dtype=torch.long, device=device)
        ret = torch.zeros(N, device=device)
        rnd: dict[str, list] = {k: [] for k in (*_ROW_KEYS, "keep", "obs_row", "call_obs")}
        ep_base = r * N
        max_calls = math.ceil(env.max_episode_steps / C)
        for _ in range(max_calls):
            active = (~env.done).to(device)
            # One host sync per policy call (C env steps): the loop must know whether any episode still runs.
            if not bool(active.any()):
                break
            with timers.range("rollout/sample"):
                obs_d = obs_to(obs, device)
                if store_ctx:  # encode once; the K steps and the buffer share this call's context
                    obs_d = policy.encode(obs_d)
                step_idx = _choose_steps(N, K, per_call, fixed, generator, device) if record else None
                rec = (sampler or policy).sample(obs_d, sch, stochastic=stochastic, generator=generator,
                                    step_index=None if step_idx is None else step_idx[:, 0],
                                    step_fn=step_fn, keep_trajectory=record and per_call > 1)
                actions = policy.to_env_actions(rec.actions[:, :C])  # the env moves them to its device
            if record:
                # Full rows now, compacted once per round (_compact_round): a boolean selection per stored
                # solver step would cost one host sync each. Every row is a copy (advanced indexing or clone):
                # a graphed sampler reuses its output buffers on the next call.
                ar = torch.arange(N, device=device)
                kd = active & (ar < n_real)
                rnd["call_obs"].append(_obs_snapshot(obs_d))
                for j in range(step_idx.shape[1]):
                    si = step_idx[:, j]
                    if per_call > 1:
                        x_t, v_old, x_next = rec.states[ar, si], rec.velocities[ar, si], rec.states[ar, si + 1]
                    else:
                        x_t, v_old, x_next = rec.x_t.clone(), rec.v_old.clone(), rec.x_next.clone()
                    for k, val in (("x_t", x_t), ("v_old", v_old), ("x_next", x_next), ("x0", rec.actions.clone()),
                                   ("step", si), ("episode", ep_base + ar), ("keep", kd),
                                   ("obs_row", (len(rnd["call_obs"]) - 1) * N + ar)):
                        rnd[k].append(val)
                calls += kd.sum()
            with timers.range("env/step"):
                res = env.step_chunk(actions)
            steps += res.steps.to(device)
            ret += res.reward.float().to(device)
            obs = res.obs
        if rnd["keep"]:
            _compact_round(rnd, rows)
        succ = env.success_once[:n_real].to(device)
        ep_success.append(succ)
        ep_steps.append(steps[:n_real])
        ep_score.append(dense_episode_score(ret[:n_real], steps[:n_real], succ, env.max_episode_steps))
        stats.env_steps += int(steps[:n_real].sum())
    stats.episode_success = torch.cat(ep_success) if ep_success else stats.episode_success
    stats.episode_steps = torch.cat(ep_steps) if ep_steps else stats.episode_steps
    stats.episode_score = torch.cat(ep_score) if ep_score else stats.episode_score
    stats.episodes = int(stats.episode_success.numel())
    stats.successes = int(stats.episode_success.sum())
    stats.policy_calls = int(calls)
    stats.time = timers.summary(reset=False)
    policy.train(was_training)
    if not record:
        return None, stats
    if not rows["step"]:
        raise RuntimeError("rollout stored no policy call; check env.max_episode_steps and policy.n_action_steps")
    buf = {k: obs_cat(v) if k == "obs" else torch.cat(v) for k, v in rows.items()}
    outcome = stats.episode_score if nft is not None and nft.score == "dense" else stats.episode_success
    if algo == "grpo":
        labels = grpo_advantages(outcome, group_size, adv_eps)  # Flow-GRPO: y is an advantage
    else:
        labels = episode_labels(outcome, nft.baseline if nft else "none", group_size)  # S4
    labels = control_labels(labels, label_control, generator).to(device)
    y = labels[buf["episode"]]
    return RolloutBuffer(y=y, **buf), stats
