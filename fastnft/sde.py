"""Flow-matching time grid, Flow-SDE coefficients and the K-step samplers (SPEC S1-S3).

Convention (openpi / pi0): ``t = 1`` is pure noise, ``t = 0`` is data; interpolant
``x_t = t * eps + (1 - t) * a``; the network predicts the velocity ``v = eps - a``.
This module is the single reference for these formulas: kernels, rollouts and tests import it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from fastnft.devices import check_generator

__all__ = [
    "FlowSDESchedule",
    "SampleRecord",
    "StepFn",
    "flow_sde_schedule",
    "ode_step",
    "sample_actions",
    "sde_step",
]


@dataclass(frozen=True)
class FlowSDESchedule:
    """Coefficients of the K-step Flow-SDE solver (SPEC S1-S2). All tensors float64 on CPU unless moved.

    Attributes:
        t: ``[K+1]`` time grid ``t_i = 1 - i / K`` (1 = noise, 0 = data).
        A: ``[K]`` coefficient of ``x_t`` in the transition mean (S2a).
        B: ``[K]`` coefficient of the velocity in the transition mean (S2a); negative.
        std: ``[K]`` standard deviation of the injected noise, ``sqrt(delta) * sigma_i`` (S2b).
        sigma: ``[K]`` diffusion scale ``sigma_i = a * sqrt(t_i / (1 - t_i'))``.
        delta: step size ``1 / K``.
        noise_level: ``a``; 0 makes every step the Euler ODE step (S2c).
    """

    t: Tensor
    A: Tensor
    B: Tensor
    std: Tensor
    sigma: Tensor
    delta: float
    noise_level: float

    @property
    def num_steps(self) -> int:
        """K, the number of denoising steps."""
        return int(self.A.shape[0])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> FlowSDESchedule:
        """Copy with every tensor moved to ``device`` / cast to ``dtype``."""
        kw = {"device": device, "dtype": dtype}
        return FlowSDESchedule(
            t=self.t.to(**kw), A=self.A.to(**kw), B=self.B.to(**kw), std=self.std.to(**kw),
            sigma=self.sigma.to(**kw), delta=self.delta, noise_level=self.noise_level,
        )


def flow_sde_schedule(num_steps: int, noise_level: float) -> FlowSDESchedule:
    """Build the time grid and Flow-SDE coefficients (SPEC S1-S2, paper Eq. 3).

    ``sigma_i = a sqrt(t_i / (1 - t_i'))`` with ``t_0' = t_1`` (avoids 1/0), ``s_i = sigma_i^2 delta / (2 t_i)``,
    ``A_i = 1 - s_i``, ``B_i = -(delta + s_i (1 - t_i))``, ``std_i = sqrt(delta) sigma_i``.

    Args:
        num_steps: K >= 1, the number of denoising steps.
        noise_level: a >= 0 (paper default 0.2). ``a = 0`` reduces every step to Euler ODE (S2c).

    Returns:
        A :class:`FlowSDESchedule` with float64 CPU tensors (cast with ``.to``).

    Raises:
        ValueError: ``num_steps < 1`` or ``noise_level < 0`` / not finite.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1 (the number of denoising steps K), got {num_steps!r}")
    if not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite float >= 0 (paper default 0.2), got {noise_level!r}")
    K = num_steps
    delta = 1.0 / K
    t = 1.0 - torch.arange(K + 1, dtype=torch.float64) / K
    ti = t[:K]
    # t_0' = t_1 keeps sigma_0 finite at t = 1; with K = 1 there is no t_1 > 0, so use t_0' = 1/2.
    t_prime = ti.clone()
    t_prime[0] = t[1] if K > 1 else 0.5
    sigma = noise_level * torch.sqrt(ti / (1.0 - t_prime))
    s = sigma**2 * delta / (2.0 * ti)
    A = 1.0 - s
    B = -(delta + s * (1.0 - ti))
    std = math.sqrt(delta) * sigma
    return FlowSDESchedule(t=t, A=A, B=B, std=std, sigma=sigma, delta=delta, noise_level=float(noise_level))


def sde_step(x_t: Tensor, v: Tensor, A: Tensor, B: Tensor, std: Tensor, z: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """One Flow-SDE transition ``x_next = A x_t + B v + std z`` (SPEC S2a-S2b).

    Args:
        x_t: ``[N, H, D]`` current sampler state, float32/bf16/float64.
        v: ``[N, H, D]`` velocity at ``(x_t, t_i)``, same dtype.
        A, B, std: per-sample coefficients ``[N]`` (or scalars / 0-d tensors) of step ``i``.
        z: optional ``[N, H, D]`` standard normal noise; drawn from ``generator`` when None.
        generator: torch RNG for ``z``, on ``x_t``'s device (fastnft.devices' draw rule).

    Returns:
        ``[N, H, D]`` next sampler state, dtype of ``x_t``.

    Raises:
        ValueError: ``generator`` lives on another device than ``x_t``.
    """
    if z is None:
        check_generator(generator, x_t, "Flow-SDE step noise")
        z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    A, B, std = (_per_sample(c, x_t) for c in (A, B, std))
    return A * x_t + B * v + std * z


def ode_step(x_t: Tensor, v: Tensor, delta: float) -> Tensor:
    """Deterministic Euler step ``x_next = x_t - delta v`` (SPEC S2c). Shapes ``[N, H, D]``."""
    return x_t - delta * v


def _per_sample(c: Tensor | float, like: Tensor) -> Tensor:
    """Broadcast a scalar or ``[N]`` coefficient against a ``[N, ...]`` tensor."""
    c = torch.as_tensor(c, device=like.device, dtype=like.dtype)
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim())) if c.dim() == 1 else c


class StepFn(Protocol):
    """Signature of a Flow-SDE step implementation (reference :func:`sde_step` or the fused Triton kernel)."""

    def __call__(self, x_t: Tensor, v: Tensor, A: Tensor, B: Tensor, std: Tensor,
                 generator: torch.Generator | None = None) -> Tensor: ...


@dataclass
class SampleRecord:
    """Result of one K-step sampling call, with the S3 training tuple of the recorded solver step.

    Attributes:
        actions: ``[N, H, D]`` final sample ``x_{t_K}`` (the action chunk in normalised units).
        x_t: ``[N, H, D]`` sampler state at the recorded step ``i`` (``x_{t_i}``).
        v_old: ``[N, H, D]`` velocity the sampling policy produced at that step (stored, never recomputed).
        x_next: ``[N, H, D]`` the next sampler state ``x_{t_{i+1}}``.
        step: ``[N]`` int64 recorded solver index ``i`` in ``0..K-1``.
        states: ``[N, K+1, H, D]`` every solver state (only with ``keep_trajectory``), else None.
        velocities: ``[N, K, H, D]`` every velocity (only with ``keep_trajectory``), else None.
    """

    actions: Tensor
    x_t: Tensor
    v_old: Tensor
    x_next: Tensor
    step: Tensor
    states: Tensor | None = None
    velocities: Tensor | None = None


VelocityFn = Callable[[Tensor, Tensor], Tensor]


def _bind_step(step_fn: StepFn, generator: torch.Generator | None, like: Tensor) -> Callable[..., Tensor]:
    """The step of one sampling call: ``step_fn.bind(generator, like)`` where the implementation offers it (the
    fused step draws ONE Philox seed per call and advances the counter per step), else ``step_fn`` with
    ``generator`` bound."""
    bind = getattr(step_fn, "bind", None)
    if bind is not None:
        return bind(generator, like)
    return lambda x, v, A, B, std: step_fn(x, v, A, B, std, generator=generator)


@torch.no_grad()
def split_noise(noise: Tensor | None, n: int, shape: tuple[int, int], generator: torch.Generator | None,
                device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The initial state ``[n, H, D]`` and the SDE noise ``[n, K, H, D]`` (or None) of one sampling call.

    ``noise`` is the per-row noise of :meth:`FlowPolicy.sample`: ``[n, K+1, H, D]`` standard normals, ``[:, 0]`` the
    initial state, ``[:, 1:]`` the K steps' SDE noise. None: the initial state is drawn from ``generator`` and the
    SDE noise is left to the step function.

    Raises:
        ValueError: ``noise`` of another shape or device.
    """
    if noise is None:
        check_generator(generator, device, "policy initial noise")
        return torch.randn((n, *shape), generator=generator, device=device), None
    if noise.dim() != 4 or noise.shape[0] != n or tuple(noise.shape[2:]) != tuple(shape):
        raise ValueError(f"noise must be [{n}, K+1, {shape[0]}, {shape[1]}] (initial state + K steps), got "
                         f"{tuple(noise.shape)}")
    if noise.device.type != torch.device(device).type:
        raise ValueError(f"noise is on {noise.device} but the policy runs on {device}; move it there first")
    return noise[:, 0], noise[:, 1:]


def sample_actions(velocity_fn: VelocityFn, noise: Tensor, schedule: FlowSDESchedule, *, stochastic: bool,
                   step_index: Tensor | None = None, generator: torch.Generator | None = None,
                   step_fn: StepFn | None = None, keep_trajectory: bool = False,
                   step_noise: Tensor | None = None) -> SampleRecord:
    """Run the K-step sampler from ``noise`` (t = 1) to an action chunk (t = 0), recording S3's tuple.

    The loop has a fixed trip count K and selects the recorded step with ``torch.where`` (no data-dependent
    branch), so it can be captured in a CUDA graph.

    Args:
        velocity_fn: ``(x [N, H, D], t [N]) -> v [N, H, D]``; context is bound by the caller.
        noise: ``[N, H, D]`` initial state ``x_{t_0}``, standard normal.
        schedule: from :func:`flow_sde_schedule` (moved to ``noise``'s device/dtype here).
        stochastic: True: Flow-SDE steps S2 (training rollouts, all K steps); False: Euler ODE S2c (evaluation).
        step_index: ``[N]`` int64 solver index to record (S3); drawn ``U{0..K-1}`` from ``generator`` when None.
        generator: RNG for the step index and the SDE noise, on ``noise``'s device.
        step_fn: implementation of the SDE step; defaults to the reference :func:`sde_step`.
        keep_trajectory: also return all K+1 states and K velocities (to store several solver steps per call).
        step_noise: ``[N, K, H, D]`` standard normal SDE noise, step i's in ``[:, i]`` (per-episode noise drawn by
            the rollout, so a row's sample does not depend on its batch); None = drawn by ``step_fn`` from
            ``generator``. When given, the step is :func:`sde_step` with this ``z`` (the fused step draws its own
            Philox noise, so it is not used).

    Returns:
        :class:`SampleRecord`.

    Raises:
        ValueError: ``noise`` is not 3-D, ``step_index`` or ``step_noise`` has the wrong shape or range, or
            ``generator`` lives on another device than ``noise``.
    """
    if noise.dim() != 3:
        raise ValueError(f"noise must be [N, H, D], got shape {tuple(noise.shape)}")
    N = noise.shape[0]
    K = schedule.num_steps
    sch = schedule.to(device=noise.device, dtype=noise.dtype)
    check_generator(generator, noise, "sampler step index / SDE noise")
    if step_index is None:
        step_index = torch.randint(0, K, (N,), generator=generator, device=noise.device)
    if step_index.shape != (N,):
        raise ValueError(f"step_index must have shape [{N}], got {tuple(step_index.shape)}")
    step_fn = step_fn or sde_step
    if step_noise is not None and step_noise.shape != (N, K, *noise.shape[1:]):
        raise ValueError(f"step_noise must be [{N}, {K}, {noise.shape[1]}, {noise.shape[2]}], got "
                         f"{tuple(step_noise.shape)}")
    x = noise
    rec_x = torch.zeros_like(noise)
    rec_v = torch.zeros_like(noise)
    rec_next = torch.zeros_like(noise)
    states, vels = [noise], []
    # Coefficients go in as 0-d views of the schedule (stride-0 broadcast), so an SDE step is one kernel launch
    # with the fused step (no per-step `coef * ones` tensors); `t` is an expanded view for the same reason.
    step = _bind_step(step_fn, generator, noise) if step_noise is None else None
    for i in range(K):
        v = velocity_fn(x, sch.t[i].expand(N))
        if stochastic and step is None:
            x_new = sde_step(x, v, sch.A[i], sch.B[i], sch.std[i], z=step_noise[:, i])  # type: ignore[index]
        elif stochastic:
            x_new = step(x, v, sch.A[i], sch.B[i], sch.std[i])
        else:
            x_new = ode_step(x, v, sch.delta)
        hit = (step_index == i).view(N, 1, 1)
        rec_x = torch.where(hit, x, rec_x)
        rec_v = torch.where(hit, v, rec_v)
        rec_next = torch.where(hit, x_new, rec_next)
        if keep_trajectory:
            states.append(x_new)
            vels.append(v)
        x = x_new
    traj = (torch.stack(states, 1), torch.stack(vels, 1)) if keep_trajectory else (None, None)
    return SampleRecord(actions=x, x_t=rec_x, v_old=rec_v, x_next=rec_next, step=step_index,
                        states=traj[0], velocities=traj[1])
