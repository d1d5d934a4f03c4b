"""Rollouts with the EMA policy: Flow-SDE sampling, chunked env execution, S3 tuples and S4 labels.

The iteration's episodes form a queue (one per seed, in seed order). Each of the env's N slots runs one episode;
when a slot's episode ends, the slot takes the next episode of the queue at once, so no slot waits for the slowest
episode of a batch. Each policy call samples one action chunk per slot and stores, for slots whose episode is
running, the S3 tuple of ``steps_per_call`` solver steps; once every episode has ended, each stored call gets its
episode's label ``y = 2 * success - 1`` (S4). The buffer lists the rows episode by episode, in seed order.

An episode's outcome depends only on its seed and its own sampler noise: every episode draws its initial noise,
SDE noise and recorded solver steps from its own generator, keyed by the call's ``generator`` and the episode's
place in the queue, and policy batches are padded to a multiple of 8 rows (CPU matmuls give a state-policy row the
same bits whatever else is in a batch of such a size, measured in the suite; one batch size is also one CUDA graph). So the slot or
worker that runs it, the number of workers and the order in which episodes finish do not change it. An episode
lost to a simulator worker that died is rerun from its seed with the same noise (at most ``max_attempts`` times);
its rows from the lost attempt are dropped.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from fastnft.config import NFTConfig
from fastnft.devices import check_generator
from fastnft.envs.base import EnvObs, VectorEnv
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
        env_steps: env steps the episodes used.
        sim_steps: env steps simulated (a lockstep simulator also steps slots whose episode is over; a worker pool
            does not, so there ``sim_steps == env_steps`` unless an episode was rerun).
        episodes_rerun: episodes started again after a simulator worker died.
        policy_calls: policy calls for running episodes (one row per episode and call).
        episode_success: ``[episodes]`` bool per episode, in seed order.
        episode_steps: ``[episodes]`` int64 env steps per episode.
        episode_score: ``[episodes]`` float32 dense score in [0, 1] per episode (:func:`dense_episode_score`).
        time: seconds per phase (``rollout/sample``, ``env/step``, ``env/reset``).
    """

    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    sim_steps: int = 0
    episodes_rerun: int = 0
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


_ROW_BUCKET = 8
"""Policy batches are padded to a multiple of this many rows (see the module docstring)."""


def _mix(key: int, j: int) -> int:
    """A 63-bit seed for episode ``j`` of a rollout keyed ``key`` (splitmix64 finaliser: nearby inputs give unrelated
    seeds)."""
    z = (key * 0x9E3779B97F4A7C15 + (j + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _episode_draws(gen: torch.Generator, K: int, shape: tuple[int, int], per_call: int,
                   fixed: int | None) -> tuple[Tensor, Tensor]:
    """One policy call's draws of one episode from its own CPU generator: noise ``[K+1, H, D]`` (initial state, then
    each step's SDE noise) and ``per_call`` distinct solver indices (S3: uniform; or the fixed one)."""
    noise = torch.randn((K + 1, *shape), generator=gen)
    if fixed is not None:
        return noise, torch.full((1,), fixed, dtype=torch.long)
    return noise, torch.rand(K, generator=gen).argsort()[:per_call]


def _pad_rows(obs: Obs, rows: int) -> Obs:
    """An observation batch padded to ``rows`` rows with copies of its first row (tensors and per-row lists of a
    dict; a shared string stays as it is). The padded rows' samples are never used."""
    def pad(v):
        if isinstance(v, Tensor):
            return v if v.shape[0] >= rows else torch.cat([v, v[:1].expand(rows - v.shape[0], *v.shape[1:])])
        if isinstance(v, list):
            return v + v[:1] * (rows - len(v))
        return v

    if isinstance(obs, dict):
        return {k: pad(v) for k, v in obs.items()}
    return pad(obs)


_ROW_KEYS = ("x_t", "v_old", "x_next", "x0", "step", "episode")


def _obs_snapshot(obs: Obs) -> Obs:
    """A copy of a call's observation that later env steps cannot overwrite (a GPU simulator may reuse its
    buffers); no host sync. Strings and lists are kept as they are (the env builds new ones per step)."""
    if isinstance(obs, Tensor):
        return obs.clone()
    if isinstance(obs, dict):
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in obs.items()}
    return obs  # a per-call context (pi0's cached prefix): built fresh by each encode


@torch.no_grad()
def run_episodes(policy: FlowPolicy, env: VectorEnv, schedule: FlowSDESchedule, seeds: list[int], *,
                 stochastic: bool, record: bool, generator: torch.Generator, nft: NFTConfig | None = None,
                 step_fn: StepFn | None = None, timers: PhaseTimers | None = None,
                 device: torch.device | str = "cpu", group_size: int = 1,
                 label_control: str = "none", algo: str = "stepnft", adv_eps: float = 1e-4,
                 sampler=None, max_attempts: int = 3) -> tuple[RolloutBuffer | None, RolloutStats]:
    """Run one episode per seed with ``policy``, the env's slots taking episodes from a queue (module docstring).

    Args:
        policy: the rollout policy (EMA weights, any :class:`~fastnft.policies.base.FlowPolicy`); eval mode. With
            ``policy.stores_context`` (pi0's ``prefix_mode: cached``) the buffer keeps each call's encoded context
            instead of its observation.
        env: the vector env (reused across calls; its slots are reset here).
        schedule: K-step Flow-SDE schedule; with ``stochastic=False`` the Euler ODE is used (evaluation).
        seeds: one seed per episode, any number (the same seed twice = two rollouts from one initial state).
        stochastic: Flow-SDE sampling (training) or deterministic ODE (evaluation, S2c).
        record: store S3 tuples and S4 labels.
        generator: keys the episodes' own noise generators (one draw per call) and shuffles control labels; on
            ``device`` (fastnft.devices' draw rule).
        nft: needed when ``record``: ``steps_per_call`` and ``step`` (random / fixed:j).
        step_fn: SDE step implementation for samplers that draw their own noise (unused here: the rollout passes
            each episode's SDE noise, and :func:`fastnft.sde.sample_actions` steps with it).
        timers: optional phase timers (``rollout/sample``, ``env/step``, ``env/reset``).
        device: device of the policy and of the returned buffer (env outputs are moved here; a GPU simulator's
            already live here).
        group_size: consecutive seeds that form one group for ``nft.baseline = group`` (S4 labels).
        label_control: ``none`` | ``shuffled`` | ``zero``, see :func:`control_labels` (control experiments).
        algo: ``stepnft`` (S4 labels) or ``grpo`` (``y`` = :func:`grpo_advantages` over groups of
            ``group_size``; the label control then applies to the advantages).
        adv_eps: the advantage's std epsilon (``grpo`` only).
        sampler: object with ``policy.sample``'s signature (``fastnft.loop.graphs.GraphedSampler``: CUDA-graph
            replays); None = ``policy.sample``. Its output is only read (indexed, hence copied) before the next call.
        max_attempts: an episode lost to a dead simulator worker this many times stops the rollout.

    Returns:
        ``(buffer or None, stats)``.

    Raises:
        ValueError: ``record`` without ``nft``, unknown ``algo``, or no seeds.
        RuntimeError: an episode was lost ``max_attempts`` times (the message names its seed and the worker's last
            log lines), or nothing was recorded.
    """
    if record and nft is None:
        raise ValueError("run_episodes(record=True) needs the NFT config (steps_per_call, step)")
    if algo not in ("stepnft", "grpo"):
        raise ValueError(f"algo must be 'stepnft' or 'grpo', got {algo!r}")
    if not seeds:
        raise ValueError("run_episodes needs at least one seed")
    timers = timers or PhaseTimers()
    was_training = policy.training
    policy.eval()
    N, K, C = env.num_envs, schedule.num_steps, policy.n_action_steps
    E = len(seeds)
    per_call = nft.steps_per_call if nft else 1
    fixed = nft.fixed_step() if nft else None
    store_ctx = bool(getattr(policy, "stores_context", False))
    device = torch.device(device)
    sch = schedule.to(device=device, dtype=torch.float32)
    shape = (policy.H, policy.D)
    check_generator(generator, device, "rollout noise key")
    key = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))  # one draw per rollout
    sim0 = env.sim_steps

    queue = deque(range(E))
    attempt = [0] * E
    slot_ep = [-1] * N  # the episode a slot runs, -1 = idle
    gens: list[torch.Generator | None] = [None] * N
    ep_success = [False] * E
    ep_steps = [0] * E
    ep_ret = [0.0] * E
    ep_calls = [0] * E
    max_calls = -(-env.max_episode_steps // C)
    reruns = 0
    calls = 0
    rnd: dict[str, list] = {k: [] for k in (*_ROW_KEYS, "live", "attempt", "obs_row", "call_obs")}

    def start(slots: list[int]) -> EnvObs:
        for s in slots:
            j = queue.popleft()
            slot_ep[s] = j
            gens[s] = torch.Generator().manual_seed(_mix(key, j))
            ep_steps[j], ep_ret[j], ep_calls[j] = 0, 0.0, 0
        with timers.range("env/reset"):
            if env.resets_slots:
                return env.reset_slots(slots, [seeds[slot_ep[s]] for s in slots])
            # An env that resets all slots at once: slots without an episode rerun the first one's seed, unrecorded.
            first = seeds[slot_ep[slots[0]]]
            return env.reset([seeds[j] if j >= 0 else first for j in slot_ep])

    obs = start(list(range(min(N, E))))
    B = -(-N // _ROW_BUCKET) * _ROW_BUCKET  # one policy batch size: one CUDA graph, row results independent of N
    while any(j >= 0 for j in slot_ep):
        live = [j >= 0 for j in slot_ep]
        with timers.range("rollout/sample"):
            noise = torch.zeros((B, K + 1, *shape))
            steps_idx = torch.zeros((B, per_call if fixed is None else 1), dtype=torch.long)
            for s in range(N):
                if live[s]:
                    noise[s], steps_idx[s] = _episode_draws(gens[s], K, shape, per_call, fixed)  # type: ignore[arg-type]
            noise_d, steps_d = noise.to(device), steps_idx.to(device)
            obs_d = _pad_rows(obs_to(obs, device), B)
            if store_ctx:  # encode once; the K steps and the buffer share this call's context
                obs_d = policy.encode(obs_d)
            rec = (sampler or policy).sample(obs_d, sch, stochastic=stochastic, generator=generator,
                                             step_index=steps_d[:, 0], step_fn=step_fn,
                                             keep_trajectory=record and per_call > 1, noise=noise_d)
            actions = policy.to_env_actions(rec.actions[:N, :C])  # the env moves them to its device
        if record:
            # Full rows now, selected once at the end: a boolean selection per call would cost a host sync each.
            # Every row is a copy (advanced indexing or clone): a graphed sampler reuses its output buffers.
            ar = torch.arange(N, device=device)
            live_d = torch.tensor(live).to(device)
            ep_d = torch.tensor([max(j, 0) for j in slot_ep]).to(device)
            att_d = torch.tensor([attempt[j] if j >= 0 else -1 for j in slot_ep]).to(device)
            rnd["call_obs"].append(_obs_snapshot(obs_d))
            for k in range(steps_d.shape[1]):
                si = steps_d[:N, k]
                if per_call > 1:
                    x_t, v_old, x_next = rec.states[ar, si], rec.velocities[ar, si], rec.states[ar, si + 1]
                else:
                    x_t, v_old, x_next = rec.x_t[:N].clone(), rec.v_old[:N].clone(), rec.x_next[:N].clone()
                for name, val in (("x_t", x_t), ("v_old", v_old), ("x_next", x_next), ("x0", rec.actions[:N].clone()),
                                  ("step", si), ("episode", ep_d), ("live", live_d), ("attempt", att_d),
                                  ("obs_row", (len(rnd["call_obs"]) - 1) * B + ar)):
                    rnd[name].append(val)
        calls += sum(live)
        with timers.range("env/step"):
            res = env.step_chunk(actions)
        # One host read per policy call (C env steps): which episodes ended (and how).
        read = [res.steps.double(), res.reward.double(), res.done.double(), res.success_once.double()]
        if res.lost is not None:  # only worker pools can lose an episode
            read.append(res.lost.double())
        r_steps, r_ret, r_done, r_succ, *r_lost = torch.stack(read).tolist()
        r_lost = r_lost[0] if r_lost else [False] * N
        obs = res.obs
        free = []
        for s in range(N):
            j = slot_ep[s]
            if j < 0:
                continue
            if r_lost[s]:
                attempt[j] += 1
                reruns += 1
                if attempt[j] >= max_attempts:
                    raise RuntimeError(f"episode {j} (seed {seeds[j]}) was lost {attempt[j]} times to a simulator "
                                       f"worker that died; stopping. Last failure: {env.failures.get(s, '(none)')}")
                warnings.warn(f"episode {j} (seed {seeds[j]}) lost to a simulator worker that died; rerunning it "
                              "from its seed with the same noise", RuntimeWarning, stacklevel=2)
                queue.appendleft(j)
            else:
                ep_steps[j] += int(r_steps[s])
                ep_ret[j] += float(r_ret[s])
                ep_calls[j] += 1
                # An episode is over after max_calls chunks whatever the env says (the bound keeps the loop finite
                # for envs that cannot tell, e.g. fake CUDA tensors without values).
                if not r_done[s] and ep_calls[j] < max_calls:
                    continue
                ep_success[j] = bool(r_succ[s])
            slot_ep[s], gens[s] = -1, None
            free.append(s)
        if free and queue and (env.resets_slots or all(j < 0 for j in slot_ep)):
            obs = start(free[:len(queue)])

    stats = RolloutStats()
    stats.episode_success = torch.tensor(ep_success, dtype=torch.bool, device=device)
    stats.episode_steps = torch.tensor(ep_steps, dtype=torch.long, device=device)
    stats.episode_score = dense_episode_score(torch.tensor(ep_ret, device=device), stats.episode_steps,
                                              stats.episode_success, env.max_episode_steps)
    stats.episodes = E
    stats.successes = int(sum(ep_success))
    stats.env_steps = int(sum(ep_steps))
    stats.sim_steps = int(env.sim_steps - sim0)
    stats.episodes_rerun = reruns
    stats.policy_calls = int(calls)
    stats.time = timers.summary(reset=False)
    policy.train(was_training)
    if not record:
        return None, stats
    if not rnd["step"]:
        raise RuntimeError("rollout stored no policy call; check env.max_episode_steps and policy.n_action_steps")
    episode = torch.cat(rnd["episode"])
    final = torch.tensor(attempt, device=device)
    keep = torch.cat(rnd["live"]) & (torch.cat(rnd["attempt"]) == final[episode])
    idx = torch.arange(keep.numel(), device=device)[keep]  # the rollout's one selection (a host sync)
    idx = idx[torch.sort(episode[idx], stable=True).indices]  # episode by episode, calls in order
    buf = {k: torch.cat(rnd[k]).index_select(0, idx) for k in _ROW_KEYS}
    buf["obs"] = obs_index(obs_cat(rnd["call_obs"]), torch.cat(rnd["obs_row"]).index_select(0, idx))
    outcome = stats.episode_score if nft is not None and nft.score == "dense" else stats.episode_success
    if algo == "grpo":
        labels = grpo_advantages(outcome, group_size, adv_eps)  # Flow-GRPO: y is an advantage
    else:
        labels = episode_labels(outcome, nft.baseline if nft else "none", group_size)  # S4
    labels = control_labels(labels, label_control, generator).to(device)
    y = labels[buf["episode"]]
    return RolloutBuffer(y=y, **buf), stats
