"""Vectorised simulator adapters behind one batched torch API (:class:`fastnft.envs.base.VectorEnv`).

:func:`make_env` builds the adapter a config names; the adapters import their simulator only when built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastnft.envs.base import ChunkResult, StepResult, VectorEnv

if TYPE_CHECKING:
    from fastnft.config import EnvConfig

__all__ = ["ChunkResult", "StepResult", "VectorEnv", "make_env"]


def make_env(cfg: EnvConfig, num_envs: int | None = None, num_workers: int | None = None) -> VectorEnv:
    """Build the vector env named by ``cfg.task`` (``bandit``, a LIBERO suite ``libero_*`` or a ManiSkill3 env id)
    with ``num_envs`` slots (default ``cfg.num_envs``) and, for CPU simulators, ``num_workers`` worker processes
    (default ``cfg.num_workers``; null = one per usable core).

    Raises:
        ValueError: unknown task name (the message lists the known ones).
        RuntimeError: the simulator cannot start (e.g. no Vulkan device for SAPIEN, LIBERO files missing or
            modified; the message says how to fix it).
    """
    n = cfg.num_envs if num_envs is None else num_envs
    if cfg.task == "bandit":
        from fastnft.envs.bandit import BanditEnv

        return BanditEnv(num_envs=n, chunk=cfg.max_episode_steps)
    if cfg.task.startswith("libero_"):
        from fastnft.envs.libero import LiberoVectorEnv

        return LiberoVectorEnv(cfg, num_envs=n, num_workers=num_workers)
    from fastnft.envs.maniskill import ManiSkillVectorEnv

    return ManiSkillVectorEnv(cfg, num_envs=n, num_workers=num_workers)
