"""The FlowPolicy protocol: what rollout, update, EMA, evaluation and checkpointing may ask of a flow policy.

A flow policy maps an observation to an action chunk ``[H, D]`` by integrating a velocity field from noise
(``t = 1``) to data (``t = 0``) with the K-step sampler of :mod:`fastnft.sde` (SPEC S1-S3). The loop needs:

- ``encode(obs) -> ctx``: everything about the observation the velocity needs, computed once per policy call
  (a state token; pi0's prefix key/value cache). ``ctx`` is read-only for the K solver steps.
- ``velocity(x_t, t, ctx) -> v``: differentiable in the trainable parameters.
- ``sample(obs, schedule, ...)``: one call, K denoising steps, the S3 tuple recorded.
- sizes: the action horizon ``H`` (lerobot's ``chunk_size``), the executed steps ``n_action_steps`` (C <= H,
  supervised by StepNFT), the padded action dim ``D``, the env's ``act_dim``; ``to_env_actions`` maps normalised,
  padded sampler output back to env actions.
- ``trainable_parameters()``: exactly what ZeRO shards and the EMA averages (S9); everything else is frozen.
- ``save(path)`` / ``load(path)``: the policy's own persistent form.

Implementations: :class:`fastnft.policies.state_flow.StateFlowPolicy` (the embedded default) and
:class:`fastnft.policies.pi0.Pi0Policy` (pi0 / pi0.5); :func:`fastnft.policies.factory.build_flow_policy` picks one
from ``policy.kind``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fastnft.sde import FlowSDESchedule, SampleRecord, StepFn

__all__ = ["FlowPolicy"]


@runtime_checkable
class FlowPolicy(Protocol):
    """Structural type of a flow-matching policy (see the module docstring). Shapes: ``x_t, v [N, H, D]``,
    ``t [N]`` float in [0, 1]; ``obs`` and ``ctx`` are policy-specific (a tensor or a dict of tensors)."""

    H: int
    """Action horizon: action tokens per policy call."""
    n_action_steps: int
    """Executed (and supervised) steps per policy call, ``<= H``."""
    D: int
    """Padded action dim of the sampler states."""
    act_dim: int
    """The env's action dim, ``<= D``."""

    def encode(self, obs: Any) -> Any:
        """Observation -> per-call context (no grad where the encoder is frozen)."""
        ...

    def velocity(self, x_t: Tensor, t: Tensor, ctx: Any) -> Tensor:
        """``v_theta(x_t, t, ctx)``: ``[N, H, D]`` float32, differentiable in :meth:`trainable_parameters`."""
        ...

    def sample(self, obs: Any, schedule: FlowSDESchedule, *, stochastic: bool,
               generator: torch.Generator | None = None, step_index: Tensor | None = None,
               step_fn: StepFn | None = None, keep_trajectory: bool = False) -> SampleRecord:
        """K denoising steps from noise (Flow-SDE S2 when ``stochastic``, Euler S2c otherwise), S3 tuple recorded."""
        ...

    def to_env_actions(self, x: Tensor) -> Tensor:
        """Normalised ``[..., D]`` -> env actions ``[..., act_dim]``."""
        ...

    def set_precision(self, dtype: str | torch.dtype) -> FlowPolicy:
        """Compute precision of the trained part: ``float32`` or ``bfloat16`` (autocast, fp32 master weights)."""
        ...

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train (ZeRO, EMA); all others are frozen."""
        ...

    def save(self, path: str | Path) -> Path:
        """Write the policy; :meth:`load` reads it back."""
        ...

    @classmethod
    def load(cls, path: str | Path, **kw: Any) -> FlowPolicy:
        """Read a policy written by :meth:`save` (or a compatible external checkpoint)."""
        ...
