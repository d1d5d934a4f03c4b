"""One batched torch API for every simulator: batched observations, per-step actions ``[N, act_dim]``, and chunked
execution with episode-done masks and ``success_once`` bookkeeping (SPEC S4).

Observations are either a ``[N, obs_dim]`` float32 tensor (state) or a dict (camera observations, lerobot's keys):
``observation.images.<camera> [N, H, W, 3]`` uint8, ``observation.state [N, state_dim]`` float32 and ``task``
(N strings). In a dict, floating-point tensors are made float32, other tensors keep their dtype (frames stay
uint8), and values that are not tensors pass through unchanged.

Episode semantics (all adapters): an episode ends at its first success or after ``max_episode_steps`` env steps.
After an env's episode ended, further actions for it are ignored (the adapter may still step it internally) and
its ``done`` / ``success_once`` flags stay latched until the next :meth:`VectorEnv.reset`.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATE_KEY", "TASK_KEY", "ChunkResult", "EnvObs", "StepResult", "VectorEnv", "image_key"]

STATE_KEY = "observation.state"
"""lerobot's key of the proprio state in a dict observation (``fastnft.policies.processor`` reads the same)."""
TASK_KEY = "task"
"""lerobot's key of the language instruction (one string per env)."""


def image_key(camera: str) -> str:
    """lerobot's key of one camera's frames: ``observation.images.<camera>``."""
    return f"observation.images.{camera}"


EnvObs = Tensor | dict[str, Any]
"""A batched observation: ``[N, obs_dim]`` float32, or a dict of ``[N, ...]`` tensors and per-env lists."""


def _obs_to_device(obs: EnvObs, device: torch.device) -> EnvObs:
    """Float tensors -> float32 on ``device``; other tensors keep their dtype (uint8 frames); the rest unchanged."""
    if isinstance(obs, Tensor):
        return obs.float().to(device)
    return {k: (v.float() if v.is_floating_point() else v).to(device) if isinstance(v, Tensor) else v
            for k, v in obs.items()}


def _obs_latch(active: Tensor, new: EnvObs, old: EnvObs) -> EnvObs:
    """Rows of ``new`` where ``active [N]`` holds, else of ``old``, per tensor; other dict values come from ``new``
    (they are per-episode constants such as the instruction, and choosing per row would be a host sync)."""
    if isinstance(new, Tensor):
        return torch.where(active.view(-1, *([1] * (new.dim() - 1))), new, old)
    return {k: torch.where(active.view(-1, *([1] * (v.dim() - 1))), v, old[k]) if isinstance(v, Tensor) else v
            for k, v in new.items()}


def _obs_clone(obs: EnvObs) -> EnvObs:
    """A copy the caller may modify: tensors cloned, lists copied."""
    if isinstance(obs, Tensor):
        return obs.clone()
    return {k: v.clone() if isinstance(v, Tensor) else list(v) if isinstance(v, list) else v for k, v in obs.items()}


@dataclass
class StepResult:
    """One env step of all N envs.

    Attributes:
        obs: ``[N, obs_dim]`` float32 observation after the step, or a dict (see the module docstring).
        reward: ``[N]`` float32 env reward (not used by StepNFT's labels; logged).
        success: ``[N]`` bool, task solved at this step.
        done: ``[N]`` bool, episode over (success, or time limit reached).
    """

    obs: EnvObs
    reward: Tensor
    success: Tensor
    done: Tensor


@dataclass
class ChunkResult:
    """Result of executing one action chunk ``[N, C, act_dim]``.

    Attributes:
        obs: ``[N, obs_dim]`` observation (or dict) after the chunk (the last real one for envs whose episode ended).
        reward: ``[N]`` float32 summed reward over the steps the env was active.
        steps: ``[N]`` int64 env steps actually executed (<= C).
        done: ``[N]`` bool, episode over (latched).
        success_once: ``[N]`` bool, success at any step of the episode so far (latched).
        lost: ``[N]`` bool, the env's episode was lost to a simulator worker that died (the worker was replaced;
            the episode must be started again, :attr:`VectorEnv.failures` says why). None for in-process
            simulators, which cannot lose one.
    """

    obs: EnvObs
    reward: Tensor
    steps: Tensor
    done: Tensor
    success_once: Tensor
    lost: Tensor | None = None


class VectorEnv(ABC):
    """N environment slots, each running its own episode; observations and all bookkeeping on :attr:`device`.

    A slot's episode starts with :meth:`reset_slots` (or :meth:`reset` for all N at once) and ends at its first
    success or after ``max_episode_steps`` env steps; :meth:`step_chunk` executes one action chunk in every slot
    whose episode is running, and slots whose episode ended are left alone until they are reset again. So a
    rollout can start the next episode in a slot as soon as the slot's last one ended
    (:func:`fastnft.loop.rollout.run_episodes`). A slot never reset counts as done.

    Subclasses implement :meth:`_reset_slots` and either :meth:`_step` (one step of all N; the base class loops
    it over the chunk) or :meth:`_step_chunk` (the whole chunk at once: CPU worker pools, which step only the
    running episodes and stop each at its end). CPU simulators keep the default ``device = cpu``; a GPU simulator
    (ManiSkill's PhysX-GPU scene) sets its CUDA device, and then observations, actions, done and success flags stay
    CUDA tensors end to end.

    With dict observations (camera observations) :attr:`obs_dim` is the width of ``observation.state``.

    Attributes:
        sim_steps: every env step simulated so far, including steps a lockstep simulator spends on slots whose
            episode is over (steps the episodes use are ``ChunkResult.steps``).
        failures: ``{slot: message}`` why a slot's last episode was lost (worker pools only).
    """

    device: torch.device = torch.device("cpu")

    num_envs: int
    obs_dim: int
    act_dim: int
    max_episode_steps: int
    action_low: Tensor  # [act_dim] float32
    action_high: Tensor  # [act_dim] float32

    def __init__(self) -> None:
        self._elapsed: Tensor | None = None
        self._done: Tensor | None = None
        self._success_once: Tensor | None = None
        self._obs: EnvObs | None = None
        self.sim_steps = 0
        self.failures: dict[int, str] = {}

    # -- to implement ---------------------------------------------------------------------------------------
    def _reset(self, seeds: list[int]) -> EnvObs:
        """Reset all N envs with the given seeds; return ``[N, obs_dim]`` float32 (or a dict) on :attr:`device`.
        Only needed by adapters that do not implement :meth:`_reset_slots`."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _reset_slots nor _reset")

    def _reset_slots(self, slots: list[int], seeds: list[int]) -> EnvObs:
        """Start a new episode in each of ``slots`` from its seed; return the observation of ALL N slots (the
        others unchanged). The default resets every slot at once and so needs ``slots`` to be all of them."""
        if sorted(slots) != list(range(self.num_envs)):
            raise NotImplementedError(f"{type(self).__name__} can only reset all {self.num_envs} envs at once")
        order = sorted(range(len(slots)), key=lambda j: slots[j])
        return self._reset([seeds[j] for j in order])

    def _step(self, actions: Tensor) -> tuple[EnvObs, Tensor, Tensor]:
        """Step all N envs with ``[N, act_dim]`` float32 actions on :attr:`device`; return obs ``[N, obs_dim]`` (or
        a dict), reward ``[N]``, success ``[N]`` bool, on :attr:`device`. Outputs of slots whose episode is over are
        ignored."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _step_chunk nor _step")

    def _step_chunk(self, actions: Tensor, live: Tensor) -> tuple[EnvObs, Tensor, Tensor, Tensor, Tensor] | None:
        """Execute ``[N, C, act_dim]`` clipped actions in the slots where ``live [N]`` holds, each stopped at its
        episode's end. Return ``(obs of all N, reward_sum [N], steps [N] int64, success [N] bool, lost [N] bool)``,
        or None to have the base class loop :meth:`_step` (the default)."""
        return None

    def close(self) -> None:
        """Release simulator resources (subprocesses, GPU scenes)."""

    # -- shared bookkeeping ----------------------------------------------------------------------------------
    def reset(self, seeds: list[int]) -> EnvObs:
        """Start N new episodes, one per seed (``len(seeds) == num_envs``). Returns ``[N, obs_dim]`` float32 (or a
        dict, see the module docstring).

        Raises:
            ValueError: wrong number of seeds.
        """
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs one seed per env: got {len(seeds)} seeds for {self.num_envs} envs")
        return self.reset_slots(list(range(self.num_envs)), seeds)

    def reset_slots(self, slots: list[int], seeds: list[int]) -> EnvObs:
        """Start a new episode in each of ``slots`` (distinct, in ``0..N-1``) from the matching seed; the other slots
        keep their state. Returns the observation of all N slots (a copy).

        Raises:
            ValueError: mismatched lengths, repeated or out-of-range slots.
        """
        if len(slots) != len(seeds):
            raise ValueError(f"reset_slots needs one seed per slot: got {len(seeds)} seeds for {len(slots)} slots")
        if len(set(slots)) != len(slots) or any(not 0 <= s < self.num_envs for s in slots):
            raise ValueError(f"slots must be distinct and in 0..{self.num_envs - 1}, got {slots}")
        obs = _obs_to_device(self._reset_slots([int(s) for s in slots], [int(s) for s in seeds]), self.device)
        n, dev = self.num_envs, self.device
        if self._done is None:
            self._elapsed = torch.zeros(n, dtype=torch.long, device=dev)
            self._done = torch.ones(n, dtype=torch.bool, device=dev)  # a slot never reset has no running episode
            self._success_once = torch.zeros(n, dtype=torch.bool, device=dev)
            self._low, self._high = self.action_low.to(dev), self.action_high.to(dev)
        assert self._elapsed is not None and self._success_once is not None
        idx = torch.as_tensor(slots, dtype=torch.long).to(dev)
        self._elapsed[idx] = 0
        self._done[idx] = False
        self._success_once[idx] = False
        self._obs = obs
        return _obs_clone(obs)

    @property
    def resets_slots(self) -> bool:
        """Whether single slots can start an episode while others run (the adapter implements
        :meth:`_reset_slots`); otherwise only all N at once (:meth:`reset`)."""
        return type(self)._reset_slots is not VectorEnv._reset_slots

    @property
    def done(self) -> Tensor:
        """``[N]`` bool: episode over (latched until the slot is reset)."""
        assert self._done is not None, "call reset() first"
        return self._done

    @property
    def success_once(self) -> Tensor:
        """``[N]`` bool: success at any step of the slot's current episode."""
        assert self._success_once is not None, "call reset() first"
        return self._success_once

    def _clip(self, actions: Tensor) -> Tensor:
        return torch.maximum(torch.minimum(actions.detach().float().to(self.device), self._high), self._low)

    def step(self, actions: Tensor) -> StepResult:
        """Step all running episodes once with ``[N, act_dim]`` actions (clipped to the action bounds); slots whose
        episode is over ignore theirs.

        Raises:
            ValueError: wrong action shape.
            RuntimeError: called before :meth:`reset`.
        """
        if self._done is None:
            raise RuntimeError("VectorEnv.step called before reset(seeds)")
        if actions.shape != (self.num_envs, self.act_dim):
            raise ValueError(f"actions must be [{self.num_envs}, {self.act_dim}], got {tuple(actions.shape)}")
        res = self.step_chunk(actions[:, None])
        return StepResult(obs=res.obs, reward=res.reward, success=res.success_once & (res.steps > 0),
                          done=res.done)

    def _loop_step(self, act: Tensor) -> tuple[Tensor, Tensor]:
        """One :meth:`_step` of all N with the bookkeeping; returns (reward [N] of running slots, active [N])."""
        assert self._done is not None and self._elapsed is not None and self._success_once is not None
        active = ~self._done
        obs, reward, success = self._step(act)
        self.sim_steps += self.num_envs  # a lockstep simulator steps every slot
        obs = _obs_to_device(obs, self.device)
        success = success.bool().to(self.device) & active
        self._elapsed += active.long()
        self._success_once |= success
        self._done |= active & (success | (self._elapsed >= self.max_episode_steps))
        # Keep the last real observation of ended envs rather than whatever the simulator returns after the end.
        self._obs = _obs_latch(active, obs, self._obs)
        return torch.where(active, reward.float().to(self.device), 0.0), active

    def step_chunk(self, actions: Tensor) -> ChunkResult:
        """Execute an action chunk ``[N, C, act_dim]`` (clipped to the action bounds) in every slot whose episode
        is running, each stopped at its episode's end.

        With a per-step simulator (:meth:`_step`) on CPU the loop stops early once every episode is over; a device
        env runs all C steps instead: the early stop would be a host sync per env step, and the steps after every
        episode ended are ignored anyway.

        Raises:
            ValueError: wrong action shape.
            RuntimeError: called before :meth:`reset`.
        """
        if self._done is None:
            raise RuntimeError("VectorEnv.step_chunk called before reset(seeds)")
        if actions.dim() != 3 or actions.shape[0] != self.num_envs or actions.shape[2] != self.act_dim:
            raise ValueError(f"chunk must be [{self.num_envs}, C, {self.act_dim}], got {tuple(actions.shape)}")
        assert self._elapsed is not None and self._success_once is not None
        act = self._clip(actions)
        live = ~self._done
        out = self._step_chunk(act, live)
        if out is None:
            total = torch.zeros(self.num_envs, device=self.device)
            steps = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
            for c in range(act.shape[1]):
                if self.device.type == "cpu" and bool(self._done.all()):
                    break
                reward, active = self._loop_step(act[:, c])
                total += reward
                steps += active.long()
            lost = None  # an in-process simulator cannot lose an episode
        else:
            obs, total, steps, success, lost = out
            obs = _obs_to_device(obs, self.device)
            steps, lost = steps.to(self.device), lost.to(self.device)
            success = success.bool().to(self.device) & live
            total = torch.where(live, total.float().to(self.device), 0.0)
            self._elapsed += steps
            self._success_once |= success
            self._done |= live & (success | (self._elapsed >= self.max_episode_steps) | lost)
            self._obs = _obs_latch(live, obs, self._obs)
        assert self._obs is not None
        return ChunkResult(obs=_obs_clone(self._obs), reward=total, steps=steps, done=self._done.clone(),
                           success_once=self._success_once.clone(), lost=lost)
