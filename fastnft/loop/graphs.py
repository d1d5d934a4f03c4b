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

pi0 / pi0.5 are graphed too: a prefix context (``prefix_mode: cached``) is copied into a static context
and one graph replays the K-step loop; an observation dict is tokenised on the host (a graph cannot capture that),
its tensors copied into static inputs, and two graphs replay: the prefix encode into static prefix buffers, then the
K-step loop (:class:`GraphedSampler`). Pre-drawn noise (``noise [N, K+1, H, D]``) is one more static input.

On CPU, or with graphs off, the same calls run eagerly with the same results for the same generator state; the
capture logic runs on CPU through a stand-in of the graph mechanism (:mod:`fastnft.testing.graphs`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from fastnft.policies.base import FlowPolicy
from fastnft.sde import FlowSDESchedule, SampleRecord, StepFn

__all__ = ["CudaGraphs", "GraphMode", "GraphedSampler", "graphs_enabled"]

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


class CudaGraphs:
    """The CUDA-graph mechanism :class:`GraphedSampler` drives (``torch.cuda.CUDAGraph``); a CPU stand-in with the
    same three methods (:class:`fastnft.testing.graphs.RecordingGraphs`) lets CPU tests run the capture logic.

    Raises:
        RuntimeError: (``check``) a torch without ``CUDAGraph.register_generator_state``.
    """

    device_type = "cuda"

    def check(self) -> str | None:
        """None when usable, else why not."""
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return ("rollout.cuda_graphs=on needs torch.cuda.CUDAGraph.register_generator_state (torch >= 2.5) so "
                    "that each replay draws new noise; upgrade torch or set off")
        return None

    def warmup(self, fn: Callable[[], Any], device: torch.device, n: int) -> None:
        """``n`` eager calls on a side stream (allocator, cuBLAS handles, Triton compilation)."""
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(n):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)

    def capture(self, fn: Callable[[], Any], generator: torch.Generator | None, pool=None) -> tuple[Any, Any]:
        """Capture ``fn()`` -> ``(graph, its output)``; ``graph.replay()`` reruns it on the same memory."""
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
        return graph, out


_GRAPHS: CudaGraphs = CudaGraphs()
"""The mechanism a :class:`GraphedSampler` uses when none is given (tests replace it with the CPU stand-in)."""


class _Capture:
    """One captured sampling call: its graphs (replayed in order), static inputs and static output.

    ``inputs`` maps a name to the static tensor a call's value is copied into (or a :class:`PrefixContext`);
    ``keep`` holds what the graphs read that must stay alive (schedule tensors, the encode graph's output)."""

    def __init__(self, graphs: list, inputs: dict[str, Any], out: SampleRecord, keep: tuple) -> None:
        self.graphs, self.inputs, self.out, self.keep = graphs, inputs, out, keep

    def copy_in(self, values: dict[str, Any]) -> None:
        for name, static in self.inputs.items():
            value = values[name]
            if isinstance(static, Tensor):
                static.copy_(value)
            else:
                static.copy_from(value)  # a PrefixContext

    def replay(self) -> SampleRecord:
        for g in self.graphs:
            g.replay()
        return self.out


class GraphedSampler:
    """``policy.sample`` captured in a CUDA graph per shape (see the module docstring); eager where graphs are off.

    Three kinds of observation are graphed, each through static inputs copied in before the replay:

    - one tensor (the state policy): ``obs [N, obs_dim]``;
    - a pi0 :class:`~fastnft.policies.pi0.PrefixContext` (``prefix_mode = cached``): copied into a static context
      with suffix room (:meth:`PrefixContext.static_like`); one graph: the K-step loop;
    - a pi0 observation dict: tokenised and normalised on the host (:meth:`Pi0Policy.process`), its tensors copied
      into static inputs; two graphs replayed in order: the prefix encode (images, language model -> static
      context) and the K-step loop reading that context.

    plus the recorded solver indices ``[N]`` and pre-drawn noise ``[N, K+1, H, D]`` when given. The sampling
    generator is registered with every graph that draws (none draws when ``noise`` and ``step_index`` are given).

    Args:
        policy: the rollout (EMA) policy on its device; its parameters must be updated in place only.
        mode: ``rollout.cuda_graphs`` (``auto`` | ``on`` | ``off``).
        warmup: eager calls on a side stream before a capture (lazy initialisation, Triton compilation).
        graphs: the graph mechanism (default :class:`CudaGraphs`; tests pass a CPU stand-in, which also enables
            graphs on its device type).

    Attributes:
        enabled: graphs in use. captures: number of captures so far (one per distinct shape/variant).

    Raises:
        RuntimeError: ``mode = on`` off CUDA, or a torch without ``CUDAGraph.register_generator_state`` (a graph
            replay would then repeat the same noise).
    """

    def __init__(self, policy: FlowPolicy, mode: GraphMode = "auto", warmup: int = 2, graphs=None) -> None:
        self.policy = policy
        self.device = next(policy.parameters()).device
        self.graphs = graphs or _GRAPHS
        on_device = self.device.type == self.graphs.device_type
        self.enabled = graphs_enabled(mode, "cuda" if on_device else self.device)
        why = self.graphs.check() if self.enabled else None
        if why is not None:
            if mode == "on":
                raise RuntimeError(why)
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
                ``step_index``) needs a ``generator`` on the graph's device type.
        """
        kw: dict[str, Any] = {"stochastic": stochastic, "generator": generator, "step_fn": step_fn,
                              "keep_trajectory": keep_trajectory}
        if noise is not None:
            kw["noise"] = noise  # only when given: a policy without the keyword keeps working
        if not self.enabled:
            return self.policy.sample(obs, schedule, step_index=step_index, **kw)
        draws = noise is None or step_index is None
        if draws and (generator is None or generator.device.type != self.graphs.device_type):
            raise ValueError("a graphed sampling call needs a CUDA generator (fastnft.devices.make_generator) to "
                             "register with the graph; the default generator's draws would repeat per replay")
        values: dict[str, Any] = {}
        if isinstance(obs, Tensor):
            values["obs"] = obs
            kind = ("tensor", tuple(obs.shape), obs.dtype)
        elif isinstance(obs, dict) and hasattr(self.policy, "process"):
            proc = self.policy.process(obs)  # host-side tokenisation: outside the graph
            values.update({f"in:{k}": v for k, v in proc.items() if isinstance(v, Tensor)})
            kind = ("inputs", tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(values.items())))
        elif hasattr(obs, "static_like"):  # a prefix context
            values["ctx"] = obs
            kind = ("ctx", tuple(obs.valid.shape), len(obs.keys), obs.keys[0].dtype, obs.state is None)
        else:
            return self.policy.sample(obs, schedule, step_index=step_index, **kw)
        if step_index is not None:
            values["step"] = step_index
        if noise is not None:
            values["noise"] = noise
        key = (kind, step_index is None, noise is None, stochastic, keep_trajectory, id(generator) if draws else None,
               id(step_fn), schedule.num_steps, schedule.noise_level)
        cap = self._cache.get(key)
        if cap is None:
            cap = self._capture(kind[0], values, schedule, kw)
            self._cache[key] = cap
        cap.copy_in(values)
        return cap.replay()

    def _capture(self, kind: str, values: dict[str, Any], schedule: FlowSDESchedule, kw: dict) -> _Capture:
        sch = schedule.to(device=self.device, dtype=torch.float32)
        statics: dict[str, Any] = {}
        for name, v in values.items():
            if name != "ctx":
                statics[name] = v.clone()
        gen = kw["generator"]
        draws = "noise" not in values or "step" not in values
        loop_kw = {**kw, "generator": gen if draws else None}
        if "noise" in statics:
            loop_kw["noise"] = statics["noise"]
        graphs, keep = [], [sch]
        if kind == "inputs":  # the prefix encode, graphed per shape, writes the context the loop graph reads
            inputs = {name[3:]: t for name, t in statics.items() if name.startswith("in:")}
            encode = lambda: self.policy.model.encode(inputs)
            self.graphs.warmup(encode, self.device, self.warmup)
            g_enc, ctx = self.graphs.capture(encode, None)
            graphs.append(g_enc)
            keep.append(ctx)
            src = ctx
        elif kind == "ctx":
            src = statics["ctx"] = values["ctx"].static_like(self.policy.cfg.suffix_len)
        else:
            src = statics["obs"]
        step = statics.get("step")
        loop = lambda: self.policy.sample(src, sch, step_index=step, **loop_kw)
        state = gen.get_state() if gen is not None else None
        self.graphs.warmup(loop, self.device, self.warmup)
        if gen is not None:
            gen.set_state(state)  # the warm-up must not consume the rollout's random stream
        g_loop, out = self.graphs.capture(loop, gen if draws else None)
        graphs.append(g_loop)
        self.captures += 1
        return _Capture(graphs, statics, out, tuple(keep))

    def clear(self) -> None:
        """Drop every capture (e.g. after the policy's parameters were replaced rather than updated in place)."""
        self._cache.clear()
