"""CUDA-graph rollouts: the K-step Flow-SDE sampler (policy velocity + fused SDE step) captured once per shape.

:class:`GraphedSampler` has :meth:`FlowPolicy.sample`'s signature. With graphs on (``rollout.cuda_graphs``:
``auto`` = on for CUDA, ``on``, ``off``) the first call for a shape captures the whole sampling call in a
``torch.cuda.CUDAGraph``; later calls copy the inputs into static buffers and replay it:

- static inputs (observations ``[N, obs_dim]``, recorded solver indices ``[N]``, the rollout's per-row noise
  ``[N, K+1, H, D]`` when given) and static outputs (the returned
  :class:`~fastnft.sde.SampleRecord` is the graph's own output: the next call overwrites it, so copy what you
  keep; the rollout indexes it, which copies);
- graph-safe random numbers: with the rollout's per-episode noise (``noise=``) nothing is drawn inside the graph;
  without it the sampling generator is a CUDA generator registered with the graph
  (``CUDAGraph.register_generator_state``), so each replay advances its Philox offset and draws new noise
  (initial noise, SDE noise or the fused step's seed, and solver indices when none are given);
- the EMA weights are updated in place (:class:`fastnft.engine.ema.EMA`), which the graph reads, so an EMA update
  needs no recapture; a new shape (N, stochastic, trajectory) or schedule gets its own capture. In bf16 mode the
  captured autocast casts read the fp32 weights on every replay: autocast caches casts only of leaves that
  require grad, and the EMA copy requires none (a policy whose weights do would replay stale casts);
- no host sync inside the captured region (the GPU tests check it with ``torch.cuda.set_sync_debug_mode``).

On CPU, or with graphs off, the same calls run eagerly with the same results for the same generator state.
Observations that are not one tensor (pi0's dicts of frames, state and instruction, or its prefix context) always
run eagerly: the processor tokenises the instruction on the host, which a graph cannot capture.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from fastnft.policies.base import FlowPolicy
from fastnft.sde import FlowSDESchedule, SampleRecord, StepFn

__all__ = ["GraphMode", "GraphedSampler", "graphs_enabled"]

GraphMode = Literal["auto", "on", "off"]


def graphs_enabled(mode: GraphMode, device: torch.device | str) -> bool:
    """Whether CUDA graphs are used for ``rollout.cuda_graphs = mode`` on ``device``.

    Raises:
        ValueError: unknown mode.
        RuntimeError: ``on`` for a non-CUDA device (the message names the fix).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"rollout.cuda_graphs must be 'auto', 'on' or 'off', got {mode!r}")
    is_cuda = torch.device(device).type == "cuda"
    if mode == "on" and not is_cuda:
        raise RuntimeError(f"rollout.cuda_graphs=on needs a CUDA device, the policy runs on {device}; set "
                           "rollout.cuda_graphs: auto (graphs on CUDA, eager elsewhere) or off")
    return is_cuda and mode != "off"


class _Capture:
    """One captured sampling call: the graph, its static inputs and its static output."""

    def __init__(self, graph, obs: Tensor, step: Tensor | None, noise: Tensor | None, out: SampleRecord,
                 schedule: FlowSDESchedule):
        self.graph, self.obs, self.step, self.noise, self.out = graph, obs, step, noise, out
        self.schedule = schedule  # the graph reads these tensors: keep them alive


class GraphedSampler:
    """``policy.sample`` captured in a CUDA graph per shape (see the module docstring); eager where graphs are off.

    Args:
        policy: the rollout (EMA) policy on its device; its parameters must be updated in place only.
        mode: ``rollout.cuda_graphs`` (``auto`` | ``on`` | ``off``).
        warmup: eager calls on a side stream before a capture (lazy initialisation, Triton compilation).

    Attributes:
        enabled: graphs in use. captures: number of captures so far (one per distinct shape/variant).

    Raises:
        RuntimeError: ``mode = on`` off CUDA, or a torch without ``CUDAGraph.register_generator_state`` (a graph
            replay would then repeat the same noise).
    """

    def __init__(self, policy: FlowPolicy, mode: GraphMode = "auto", warmup: int = 2) -> None:
        self.policy = policy
        self.device = next(policy.parameters()).device
        self.enabled = graphs_enabled(mode, self.device)
        if self.enabled and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            if mode == "on":
                raise RuntimeError("rollout.cuda_graphs=on needs torch.cuda.CUDAGraph.register_generator_state "
                                   "(torch >= 2.5) so that each replay draws new noise; upgrade torch or set off")
            self.enabled = False
        self.warmup = warmup
        self.captures = 0
        self._cache: dict[tuple, _Capture] = {}

    @torch.no_grad()
    def sample(self, obs: Tensor | dict, schedule: FlowSDESchedule, *, stochastic: bool,
               generator: torch.Generator | None = None, step_index: Tensor | None = None,
               step_fn: StepFn | None = None, keep_trajectory: bool = False,
               noise: Tensor | None = None) -> SampleRecord:
        """:meth:`FlowPolicy.sample`, replayed from a CUDA graph when enabled (same arguments, SPEC S2-S3).

        With graphs the returned record is the graph's static output: valid until the next call.

        Raises:
            ValueError: as :meth:`FlowPolicy.sample`; a graphed call that draws (no ``noise``, or no
                ``step_index``) also needs a CUDA ``generator``.
        """
        kw = {"stochastic": stochastic, "generator": generator, "step_fn": step_fn, "keep_trajectory": keep_trajectory}
        if not self.enabled or not isinstance(obs, Tensor):
            return self.policy.sample(obs, schedule, step_index=step_index, noise=noise, **kw)
        draws = noise is None or step_index is None
        if draws and (generator is None or generator.device.type != "cuda"):
            raise ValueError("a graphed sampling call that draws random numbers needs a CUDA generator "
                             "(fastnft.devices.make_generator) to register with the graph; the default generator's "
                             "draws would repeat per replay")
        key = (tuple(obs.shape), obs.dtype, step_index is None, noise is None, stochastic, keep_trajectory,
               id(generator) if draws else None, id(step_fn), schedule.num_steps, schedule.noise_level)
        cap = self._cache.get(key)
        if cap is None:
            cap = self._capture(obs, schedule, step_index, noise, kw, draws)
            self._cache[key] = cap
        cap.obs.copy_(obs)
        if cap.step is not None:
            cap.step.copy_(step_index)
        if cap.noise is not None:
            cap.noise.copy_(noise)
        cap.graph.replay()
        return cap.out

    def _capture(self, obs: Tensor, schedule: FlowSDESchedule, step_index: Tensor | None, noise: Tensor | None,
                 kw: dict, draws: bool) -> _Capture:
        sch = schedule.to(device=obs.device, dtype=torch.float32)
        static_obs = obs.clone()
        static_step = None if step_index is None else step_index.clone()
        static_noise = None if noise is None else noise.clone()
        gen = kw["generator"] if draws else None
        if not draws:
            kw = {**kw, "generator": None}  # nothing is drawn: no generator state to register
        side = torch.cuda.Stream(device=obs.device)
        side.wait_stream(torch.cuda.current_stream(obs.device))
        state = gen.get_state() if gen is not None else None
        with torch.cuda.stream(side):  # warm-up off the capture: allocator, cuBLAS handles, Triton compilation
            for _ in range(self.warmup):
                self.policy.sample(static_obs, sch, step_index=static_step, noise=static_noise, **kw)
        torch.cuda.current_stream(obs.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if gen is not None:
            gen.set_state(state)  # the warm-up must not consume the rollout's random stream
            graph.register_generator_state(gen)
        with torch.cuda.graph(graph):
            out = self.policy.sample(static_obs, sch, step_index=static_step, noise=static_noise, **kw)
        self.captures += 1
        return _Capture(graph, static_obs, static_step, static_noise, out, sch)

    def clear(self) -> None:
        """Drop every capture (e.g. after the policy's parameters were replaced rather than updated in place)."""
        self._cache.clear()
