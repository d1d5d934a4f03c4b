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

from abc import ABC, abstractmethod
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
    """Result of executing one action chunk ``[N, C, act_dim]`` step by step.

    Attributes:
        obs: ``[N, obs_dim]`` observation (or dict) after the chunk (stale for envs whose episode ended).
        reward: ``[N]`` float32 summed reward over the steps the env was active.
        steps: ``[N]`` int64 env steps actually executed (<= C).
        done: ``[N]`` bool, episode over (latched).
        success_once: ``[N]`` bool, success at any step of the episode so far (latched).
    """

    obs: EnvObs
    reward: Tensor
    steps: Tensor
    done: Tensor
    success_once: Tensor


class VectorEnv(ABC):
    """N environments stepped in lockstep; observations and all bookkeeping on :attr:`device`.

    Subclasses implement :meth:`_reset` and :meth:`_step`; this base class keeps the episode bookkeeping so all
    adapters agree on it. CPU simulators keep the default ``device = cpu``; a GPU simulator (ManiSkill's PhysX-GPU
    scene) sets its CUDA device, and then observations, actions, done and success flags stay CUDA tensors end to
    end: the base class adds no host sync per env step.

    With dict observations (camera observations) :attr:`obs_dim` is the width of ``observation.state``.
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

    # -- to implement ---------------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self, seeds: list[int]) -> EnvObs:
        """Reset all N envs with the given seeds; return ``[N, obs_dim]`` float32 (or a dict) on :attr:`device`."""

    @abstractmethod
    def _step(self, actions: Tensor) -> tuple[EnvObs, Tensor, Tensor]:
        """Step all N envs with ``[N, act_dim]`` float32 actions on :attr:`device`; return obs ``[N, obs_dim]`` (or
        a dict), reward ``[N]``, success ``[N]`` bool, on :attr:`device`. On CPU it is called only while at least one
        env is active; a device env may also be stepped after every episode ended (its output is ignored)."""

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
        obs = _obs_to_device(self._reset([int(s) for s in seeds]), self.device)
        n, dev = self.num_envs, self.device
        self._elapsed = torch.zeros(n, dtype=torch.long, device=dev)
        self._done = torch.zeros(n, dtype=torch.bool, device=dev)
        self._success_once = torch.zeros(n, dtype=torch.bool, device=dev)
        self._low, self._high = self.action_low.to(dev), self.action_high.to(dev)
        self._obs = obs
        return obs

    @property
    def done(self) -> Tensor:
        """``[N]`` bool: episode over (latched until reset)."""
        assert self._done is not None, "call reset() first"
        return self._done

    @property
    def success_once(self) -> Tensor:
        """``[N]`` bool: success at any step of the current episode."""
        assert self._success_once is not None, "call reset() first"
        return self._success_once

    def step(self, actions: Tensor) -> StepResult:
        """Step all envs once with ``[N, act_dim]`` actions (clipped to the action bounds); ended envs ignore theirs.

        Raises:
            ValueError: wrong action shape.
            RuntimeError: called before :meth:`reset`.
        """
        if self._done is None:
            raise RuntimeError("VectorEnv.step called before reset(seeds)")
        if actions.shape != (self.num_envs, self.act_dim):
            raise ValueError(f"actions must be [{self.num_envs}, {self.act_dim}], got {tuple(actions.shape)}")
        act = torch.maximum(torch.minimum(actions.detach().float().to(self.device), self._high), self._low)
        active = ~self._done
        obs, reward, success = self._step(act)
        obs = _obs_to_device(obs, self.device)
        success = success.bool().to(self.device) & active
        self._elapsed += active.long()
        self._success_once |= success
        newly_done = active & (success | (self._elapsed >= self.max_episode_steps))
        self._done |= newly_done
        # Keep the last real observation of ended envs rather than whatever the simulator returns after the end.
        self._obs = _obs_latch(active, obs, self._obs)
        return StepResult(obs=_obs_clone(self._obs), reward=torch.where(active, reward.float().to(self.device), 0.0),
                          success=success, done=self._done.clone())

    def step_chunk(self, actions: Tensor) -> ChunkResult:
        """Execute an action chunk ``[N, C, act_dim]`` one step at a time.

        On CPU it stops early once every env is done. A device env runs all C steps instead: the early stop would
        be a host sync per env step, and the steps after every episode ended are ignored anyway.
        """
        if actions.dim() != 3 or actions.shape[0] != self.num_envs or actions.shape[2] != self.act_dim:
            raise ValueError(f"chunk must be [{self.num_envs}, C, {self.act_dim}], got {tuple(actions.shape)}")
        total = torch.zeros(self.num_envs, device=self.device)
        steps = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        for c in range(actions.shape[1]):
            if self.device.type == "cpu" and bool(self.done.all()):
                break
            active = ~self.done
            res = self.step(actions[:, c])
            total += res.reward
            steps += active.long()
        assert self._obs is not None
        return ChunkResult(obs=_obs_clone(self._obs), reward=total, steps=steps, done=self.done.clone(),
                           success_once=self.success_once.clone())
