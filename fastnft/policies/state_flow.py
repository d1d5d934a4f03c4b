"""State-based flow policy: a small transformer action expert over ``[state token, H action tokens]``.

The action-token input follows pi0: the noisy action ``x_t`` is projected to the width, concatenated with a
sinusoidal embedding of the flow time ``t`` and mixed by a two-layer swish MLP ("action-time MLP"). The state is
one extra token. The output head maps each action token back to a velocity ``v = eps - a`` (SPEC notation).
Actions live in normalised units inside the policy; :meth:`StateFlowPolicy.to_env_actions` maps them back.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastnft.atomic import torch_save_atomic
from fastnft.config import PolicyConfig
from fastnft.policies.normalizer import Normalizer, StateProcessor
from fastnft.sde import FlowSDESchedule, SampleRecord, StepFn, sample_actions, split_noise

__all__ = ["StateFlowPolicy", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0,
                              compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """pi0's sine-cosine embedding of the flow time.

    Args:
        t: ``[N]`` flow time in [0, 1].
        dim: even embedding width.
        compute_dtype: dtype of the periods, the arguments and sin / cos. pi0 / pi0.5 pass float64, as openpi's and
            lerobot's ``create_sinusoidal_pos_embedding`` do: in float32 the argument ``2 pi t / p`` (up to
            ``2 pi / 4e-3 ~ 1571``) carries a rounding error of ~1e-4 that reaches the velocity (~3e-5).
            Devices without float64 (MPS) fall back to float32.

    Returns:
        ``[N, dim]`` float32: ``[sin(2 pi t / p_k), cos(2 pi t / p_k)]`` over geometric periods
        ``p_k`` from ``min_period`` to ``max_period``.

    Raises:
        ValueError: odd ``dim``.
    """
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    if t.device.type == "mps" and compute_dtype == torch.float64:
        compute_dtype = torch.float32
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=compute_dtype)
    period = min_period * (max_period / min_period) ** frac
    arg = t.to(compute_dtype)[:, None] * (2.0 * math.pi / period)[None, :]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1).float()


class _Block(nn.Module):
    """Pre-norm transformer block; attention through PyTorch SDPA (flash-attn is an optional GPU extra)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        n, s, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p).transpose(1, 2).reshape(n, s, w)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class StateFlowPolicy(nn.Module):
    """Flow-matching action expert conditioned on a low-dimensional state.

    Args:
        obs_dim: state observation width.
        act_dim: env action width (<= D).
        cfg: :class:`PolicyConfig` (horizon H, executed steps ``n_action_steps`` C, width, depth, heads, K).
        obs_norm: observation normaliser (``[obs_dim]``); identity when None.
        act_norm: action normaliser (``[act_dim]``); identity when None.

    Shapes: observations ``[N, obs_dim]``; sampler states and velocities ``[N, H, D]`` (normalised units,
    D = ``cfg.action_pad`` or ``act_dim``); flow time ``[N]``.

    Precision (:meth:`set_precision`): the weights are always fp32. The policy boundary casts every input to
    fp32; in ``bfloat16`` mode the network runs under ``torch.autocast(bf16)`` and the velocity is cast back, so
    callers always see float32 velocities.
    """

    def __init__(self, obs_dim: int, act_dim: int, cfg: PolicyConfig, obs_norm: Normalizer | None = None,
                 act_norm: Normalizer | None = None) -> None:
        super().__init__()
        if cfg.action_pad and cfg.action_pad < act_dim:
            raise ValueError(f"policy.action_pad={cfg.action_pad} is smaller than the env's action dim {act_dim}; "
                             f"set it to 0 (no padding) or >= {act_dim}")
        self.cfg = cfg
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.D = cfg.action_pad or act_dim
        self.H, self.n_action_steps = cfg.horizon, cfg.n_action_steps
        w = cfg.width
        # Set before any submodule: a plain attribute, so its statistics stay out of state_dict (see _apply).
        self.processor = StateProcessor(obs_norm or Normalizer.identity(obs_dim), act_norm or Normalizer.identity(act_dim))
        self.state_in = nn.Sequential(nn.Linear(obs_dim, w), nn.SiLU(), nn.Linear(w, w))
        self.action_in = nn.Linear(self.D, w)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w))
        self.pos = nn.Parameter(torch.zeros(1, 1 + self.H, w))
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(_Block(w, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(w)
        self.action_out = nn.Linear(w, self.D)
        self.compute_dtype = torch.float32

    def set_precision(self, dtype: str | torch.dtype) -> StateFlowPolicy:
        """Compute precision of the network: ``float32`` or ``bfloat16`` (autocast; weights stay fp32 masters).

        Raises:
            ValueError: another dtype.
        """
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if dt not in (torch.float32, torch.bfloat16):
            raise ValueError(f"policy precision must be float32 or bfloat16, got {dtype!r}")
        self.compute_dtype = dt
        return self

    def _apply(self, fn, recurse: bool = True):
        """Move the processor's statistics with the network (they are not submodules)."""
        super()._apply(fn, recurse)
        self.processor.apply_(fn)
        return self

    # -- network ----------------------------------------------------------------------------------------------
    def encode(self, obs: Tensor) -> Tensor:
        """State token: ``[N, obs_dim]`` raw observation (any float dtype) -> ``[N, 1, width]`` (compute dtype)."""
        z = self.processor.normalize_obs(obs)  # normalised in fp32: raw states can be large
        if self.compute_dtype == torch.float32:
            return self.state_in(z).unsqueeze(1)
        with torch.autocast(z.device.type, dtype=self.compute_dtype):
            return self.state_in(z).unsqueeze(1)

    def velocity(self, x_t: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        """Velocity ``v_theta(x_t, t, ctx)``: ``x_t [N, H, D]``, ``t [N]``, ``ctx [N, 1, width]`` -> ``[N, H, D]``
        float32 (computed in :attr:`compute_dtype`)."""
        x_t, t = x_t.float(), t.float()
        if self.compute_dtype == torch.float32:
            return self._velocity(x_t, t, ctx)
        with torch.autocast(x_t.device.type, dtype=self.compute_dtype):
            return self._velocity(x_t, t, ctx).float()

    def _velocity(self, x_t: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        n = x_t.shape[0]
        temb = sinusoidal_time_embedding(t, self.cfg.width).to(x_t.dtype)
        a = self.action_in(x_t)
        a = self.action_time_mlp(torch.cat([a, temb[:, None, :].expand(n, self.H, -1)], dim=-1))
        h = torch.cat([ctx.to(a.dtype), a], dim=1) + self.pos
        for blk in self.blocks:
            h = blk(h)
        return self.action_out(self.norm(h[:, 1:]))

    def forward(self, x_t: Tensor, t: Tensor, obs: Tensor) -> Tensor:
        """``velocity(x_t, t, encode(obs))``; the module call the engine wraps."""
        return self.velocity(x_t, t, self.encode(obs))

    # -- actions ------------------------------------------------------------------------------------------------
    def normalize_actions(self, actions: Tensor) -> Tensor:
        """Env actions ``[..., act_dim]`` -> normalised, zero-padded ``[..., D]``."""
        a = self.processor.normalize_actions(actions)
        if self.D > self.act_dim:
            a = F.pad(a, (0, self.D - self.act_dim))
        return a

    def to_env_actions(self, x: Tensor) -> Tensor:
        """Normalised sampler output ``[..., D]`` -> env actions ``[..., act_dim]``."""
        return self.processor.unnormalize_actions(x[..., : self.act_dim])

    @torch.no_grad()
    def sample(self, obs: Tensor, schedule: FlowSDESchedule, *, stochastic: bool,
               generator: torch.Generator | None = None, step_index: Tensor | None = None,
               step_fn: StepFn | None = None, keep_trajectory: bool = False,
               noise: Tensor | None = None) -> SampleRecord:
        """Sample an action chunk for each observation (SPEC S2; S3 tuple recorded).

        Args:
            obs: ``[N, obs_dim]`` raw observations.
            schedule: K-step Flow-SDE schedule.
            stochastic: Flow-SDE (training rollouts) or Euler ODE (evaluation).
            generator: RNG for the initial noise, the step index and the SDE noise; on ``obs``'s device.
            step_index: ``[N]`` solver index to record; random when None.
            step_fn: SDE step implementation (reference or fused kernel).
            keep_trajectory: also return every solver state and velocity (for several records per call).
            noise: ``[N, K+1, H, D]`` float32 standard normals per row (initial state, then each step's SDE noise;
                :func:`fastnft.sde.split_noise`): the rollout's per-episode noise. None = drawn from ``generator``.

        Returns:
            :class:`fastnft.sde.SampleRecord` in normalised units (``actions [N, H, D]``).

        Raises:
            ValueError: ``generator`` or ``noise`` lives on another device than ``obs``; ``noise`` of a wrong shape.
        """
        x0, step_noise = split_noise(noise, obs.shape[0], (self.H, self.D), generator, obs.device)
        ctx = self.encode(obs)
        return sample_actions(lambda x, t: self.velocity(x, t, ctx), x0, schedule, stochastic=stochastic,
                              step_index=step_index, generator=generator, step_fn=step_fn,
                              keep_trajectory=keep_trajectory, step_noise=step_noise)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that requires grad (the whole expert; the normalisers are buffers): what ZeRO shards and
        the EMA averages (SPEC S9)."""
        return [q for q in self.parameters() if q.requires_grad]

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write the policy file ``{"policy": export(), "meta": meta}`` atomically (one ``torch.save`` file).

        Returns:
            ``path``.
        """
        return torch_save_atomic(path, {"policy": self.export(), "meta": dict(meta or {})})

    @classmethod
    def load(cls, path: str | Path, cfg: PolicyConfig | None = None) -> StateFlowPolicy:
        """Read a file written by :meth:`save` (``weights_only``); :func:`fastnft.policies.io.load_policy` adds the
        checks against an experiment config and friendlier errors.

        Raises:
            ValueError: not a policy file, or its architecture differs from ``cfg``.
        """
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "policy" not in blob:
            raise ValueError(f"{str(path)!r} is not a fastnft policy file (no 'policy' entry)")
        return cls.from_export(blob["policy"], cfg)

    def export(self) -> dict:
        """Everything needed to rebuild this policy: dims, config, network weights and the processor's statistics."""
        return {"kind": "state_flow", "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "policy_cfg": asdict(self.cfg), "state_dict": self.state_dict(),
                "processor": self.processor.state_dict()}

    @classmethod
    def from_export(cls, blob: dict, cfg: PolicyConfig | None = None) -> StateFlowPolicy:
        """Rebuild from :meth:`export`. ``cfg`` (the current config) must match the saved architecture.

        Raises:
            ValueError: not a state-flow policy blob, or the architecture differs from ``cfg``.
        """
        if not isinstance(blob, dict) or blob.get("kind") != "state_flow":
            raise ValueError("checkpoint does not hold a state-based flow policy (missing kind='state_flow')")
        saved_cfg = dict(blob["policy_cfg"])
        if "chunk" in saved_cfg:  # written before policy.chunk was renamed n_action_steps (cached SFT files)
            saved_cfg["n_action_steps"] = saved_cfg.pop("chunk")
        saved = PolicyConfig(**saved_cfg)
        if cfg is not None:
            arch = ("horizon", "n_action_steps", "action_pad", "width", "depth", "heads", "mlp_ratio")
            diff = [f"policy.{k}: checkpoint {getattr(saved, k)} vs config {getattr(cfg, k)}" for k in arch
                    if getattr(saved, k) != getattr(cfg, k)]
            if diff:
                raise ValueError("checkpoint architecture differs from the config (" + "; ".join(diff) +
                                 "); use the config the checkpoint was trained with, or retrain SFT")
        use = cfg or saved
        obs_dim, act_dim = blob["obs_dim"], blob["act_dim"]
        weights = dict(blob["state_dict"])
        # Files written before the processor split keep the statistics among the weights (as normaliser buffers).
        stats = blob.get("processor") or {k: weights.pop(k) for k in list(weights) if k.startswith(("obs_norm.",
                                                                                                        "act_norm."))}
        pol = cls(obs_dim, act_dim, use)
        pol.processor = StateProcessor.from_state_dict(stats)
        pol.load_state_dict(weights)
        return pol
