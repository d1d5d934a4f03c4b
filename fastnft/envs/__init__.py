"""Vectorised simulator adapters behind one batched torch API (:class:`fastnft.envs.base.VectorEnv`)."""

from fastnft.envs.base import ChunkResult, StepResult, VectorEnv, make_env

__all__ = ["ChunkResult", "StepResult", "VectorEnv", "make_env"]
