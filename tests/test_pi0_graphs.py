"""pi0 / pi0.5 rollouts in CUDA graphs, checked without a GPU (issue 22, part 3).

- host syncs: :class:`fastnft.testing.syncs.SyncCounter` counts none in the K-step loop given a prefix, for SDPA
  and for the flash path's varlen packing (flash-attn's contract emulated on CPU by ``reference_varlen``);
- capturability proxy: ``torch.compile(fullgraph=True, dynamic=False)`` of the velocity call and of the whole
  K-step loop (pre-drawn noise, so nothing is drawn from a generator) traces without a graph break and without a
  recompile for new data (backend ``eager``: the check is Dynamo's tracing, not code generation);
- capture logic: :class:`fastnft.loop.graphs.GraphedSampler` over the CPU stand-in
  :class:`fastnft.testing.graphs.RecordingGraphs` (capture records the callable, replay reruns it into the static
  outputs): replays equal eager samples bit for bit, for new batches and after an in-place (EMA) weight update;
- the static prefix buffers: the in-place suffix writes give the concatenating path's velocities.

The fake-CUDA rollout + update over a graphed pi0 is in tests/test_pi0_graphs_fake_cuda.py (its own process).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastnft.loop.graphs import GraphedSampler
from fastnft.policies import attention as attention_mod
from fastnft.policies import pi0 as pi0_mod
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import Pi0Config
from fastnft.sde import flow_sde_schedule
from fastnft.testing.graphs import RecordingGraphs
from fastnft.testing.syncs import SyncCounter


def _policy(variant: str = "pi0") -> Pi0Policy:
    torch.manual_seed(0)
    pol = Pi0Policy(Pi0Config.tiny(variant)).eval()
    with torch.no_grad():  # non-trivial expert weights (adaRMS dense layers start at zero)
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    return pol


def _inputs(cfg: Pi0Config, B: int, seed: int) -> dict:
    """Processed inputs with padded prompts of different lengths and a missing camera (padding in the prefix)."""
    g = torch.Generator().manual_seed(seed)
    N, S, L = len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    lens = torch.randint(1, L + 1, (B,), generator=g)
    lang = torch.arange(L)[None] < lens[:, None]
    masks = torch.ones(B, N, dtype=torch.bool)
    masks[seed % B, -1] = False
    return {"images": torch.rand(B, N, 3, S, S, generator=g) * 2 - 1, "image_masks": masks,
            "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L), generator=g) * lang, "lang_masks": lang,
            "state": torch.randn(B, cfg.max_state_dim, generator=g)}


def _flash_on_cpu(monkeypatch, syncs: SyncCounter | None = None) -> None:
    """pi0 takes the flash path; flash-attn's varlen call is ``reference_varlen`` in bf16 (its own per-sequence
    loop is not counted: on a GPU that is flash-attn's kernel)."""
    def varlen(q, k, v, *args, **kw):
        pause = syncs.pause() if syncs is not None else _nothing()
        with pause:
            dt = torch.bfloat16
            return attention_mod.reference_varlen(q.to(dt), k.to(dt), v.to(dt), *args, **kw).to(q.dtype)

    monkeypatch.setattr(pi0_mod, "resolve_backend", lambda name, device: "flash")
    monkeypatch.setattr(attention_mod, "flash_fits", lambda q, *kv: True)
    monkeypatch.setattr(attention_mod, "_flash_varlen", lambda: varlen)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# -- host syncs -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_k_step_loop_given_a_prefix_makes_no_host_sync(monkeypatch, variant, backend, stochastic):
    pol = _policy(variant)
    syncs = SyncCounter()
    if backend == "flash":
        _flash_on_cpu(monkeypatch, syncs)
    ctx = pol.encode(_inputs(pol.cfg, 3, 0))
    sch = flow_sde_schedule(5, 0.2)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 6, pol.H, pol.D)
    with syncs:
        pol.sample(ctx, sch, stochastic=stochastic, generator=g, keep_trajectory=True)  # draws from the generator
        pol.sample(ctx, sch, stochastic=stochastic, noise=noise, step_index=torch.tensor([0, 4, 2]))  # pre-drawn
        pol.sample(ctx.index(torch.tensor([2, 0])), sch, stochastic=stochastic, generator=g)  # a stored context
    assert syncs.total == 0, syncs.report()


# -- capturability proxy ----------------------------------------------------------------------------------------
@pytest.fixture
def _no_recompile(monkeypatch):
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_velocity_compiles_fullgraph(_no_recompile, variant):
    pol = _policy(variant)
    B = 3
    ctx = pol.encode(_inputs(pol.cfg, B, 0)).with_room(pol.cfg.suffix_len)
    vel = lambda x, t: pol.velocity(x, t, ctx)
    with torch.no_grad():  # warm-up, as before a capture: the block layouts are built (host-to-device) and cached
        vel(torch.zeros(B, pol.H, pol.D), torch.ones(B))
    compiled = torch.compile(vel, fullgraph=True, dynamic=False, backend="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):  # new data: no recompile (error_on_recompile)
            x, t = torch.randn(B, pol.H, pol.D, generator=g), torch.rand(B, generator=g)
            assert torch.equal(compiled(x, t), vel(x, t))


def test_k_step_loop_compiles_fullgraph(_no_recompile):
    pol = _policy("pi0")
    B, K = 3, 3
    ctx = pol.encode(_inputs(pol.cfg, B, 0))
    sch = flow_sde_schedule(K, 0.2)

    def loop(noise, step):
        rec = pol.sample(ctx, sch, stochastic=True, step_index=step, noise=noise)
        return rec.actions, rec.x_t, rec.v_old, rec.x_next

    with torch.no_grad():  # warm-up, as before a capture
        loop(torch.zeros(B, K + 1, pol.H, pol.D), torch.zeros(B, dtype=torch.long))
    compiled = torch.compile(loop, fullgraph=True, dynamic=False, backend="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(2):
            noise, step = torch.randn(B, K + 1, pol.H, pol.D, generator=g), torch.randint(0, K, (B,), generator=g)
            for a, b in zip(compiled(noise, step), loop(noise, step), strict=True):
                assert torch.equal(a, b)


# -- capture logic on the CPU stand-in --------------------------------------------------------------------------
def _record(sampler, obs, sch, gen, **kw):
    """(graphed, eager) records of one call from the same generator state, copied (the graphed one is static)."""
    state = gen.get_state() if gen is not None else None
    graphed = {k: v.clone() for k, v in vars(sampler.sample(obs, sch, generator=gen, **kw)).items() if v is not None}
    if gen is not None:
        gen.set_state(state)
    eager = sampler.policy.sample(obs, sch, generator=gen, **kw)
    return graphed, {k: v for k, v in vars(eager).items() if v is not None}


def _assert_equal(graphed, eager, tag):
    assert graphed.keys() == eager.keys(), tag
    for k in graphed:
        assert torch.equal(graphed[k], eager[k]), f"{tag}: {k} differs (max {(graphed[k] - eager[k]).abs().max()})"


@pytest.mark.parametrize(("variant", "kind", "backend"), [
    ("pi0", "inputs", "sdpa"), ("pi05", "inputs", "sdpa"), ("pi0", "context", "sdpa"), ("pi05", "context", "sdpa"),
    ("pi0", "inputs", "flash"), ("pi05", "context", "flash")])
def test_replays_equal_eager_for_new_batches_and_after_an_ema_update(monkeypatch, variant, kind, backend):
    """Batches differ in their padding (prompt lengths, a missing camera), so a packing or mask kept from the
    capture's batch instead of rebuilt inside the graph shows up as a mismatch."""
    pol = _policy(variant)
    if backend == "flash":
        _flash_on_cpu(monkeypatch)
    graphs = RecordingGraphs()
    sampler = GraphedSampler(pol, "on", graphs=graphs)
    assert sampler.enabled
    sch, gen = flow_sde_schedule(4, 0.2), torch.Generator().manual_seed(1)
    obs = lambda B, seed: _inputs(pol.cfg, B, seed) if kind == "inputs" else pol.encode(_inputs(pol.cfg, B, seed))
    for call, seed in enumerate((0, 1, 2)):
        if call == 2:
            with torch.no_grad():  # the EMA update: in place, seen by the next replay without recapture
                for p in pol.trainable_parameters():
                    p.mul_(0.9).add_(0.01)
        _assert_equal(*_record(sampler, obs(3, seed), sch, gen, stochastic=True, keep_trajectory=True),
                      f"call {call}")
    n_graphs = 2 if kind == "inputs" else 1  # the encode graph, then the K-step loop
    assert sampler.captures == 1 and len(graphs.captured) == n_graphs
    assert [g.replays for g in graphs.captured] == [3] * n_graphs
    assert graphs.registered[-1] is gen and (kind == "context" or graphs.registered[0] is None)
    # a new batch size is a new capture; the old shape still replays
    _assert_equal(*_record(sampler, obs(5, 3), sch, gen, stochastic=False), "batch 5, ODE")
    _assert_equal(*_record(sampler, obs(3, 4), sch, gen, stochastic=True, keep_trajectory=True), "batch 3 again")
    assert sampler.captures == 2


def test_pre_drawn_noise_is_a_static_input_and_registers_no_generator():
    pol = _policy("pi0")
    graphs = RecordingGraphs()
    sampler = GraphedSampler(pol, "on", graphs=graphs)
    sch, K = flow_sde_schedule(4, 0.2), 4
    g = torch.Generator().manual_seed(2)
    for seed in (0, 1):
        ctx = pol.encode(_inputs(pol.cfg, 3, seed))
        noise, step = torch.randn(3, K + 1, pol.H, pol.D, generator=g), torch.randint(0, K, (3,), generator=g)
        _assert_equal(*_record(sampler, ctx, sch, None, stochastic=True, noise=noise, step_index=step),
                      f"noise {seed}")
    assert sampler.captures == 1 and graphs.registered == [None]
    # row b's outcome depends only on its own noise: the same row in another batch gives the same chunk
    ctx = pol.encode(_inputs(pol.cfg, 3, 0))
    noise, step = torch.randn(3, K + 1, pol.H, pol.D, generator=g), torch.tensor([1, 1, 1])
    full = sampler.sample(ctx, sch, stochastic=True, noise=noise, step_index=step).actions.clone()
    other = noise.clone()
    other[1:] = torch.randn(2, K + 1, pol.H, pol.D, generator=g)
    assert torch.equal(sampler.sample(ctx, sch, stochastic=True, noise=other, step_index=step).actions[0], full[0])


def test_graphs_off_or_cpu_run_eagerly():
    pol = _policy("pi0")
    assert not GraphedSampler(pol, "auto").enabled  # CPU: the real CUDA mechanism is off
    graphs = RecordingGraphs()
    off = GraphedSampler(pol, "off", graphs=graphs)
    off.sample(_inputs(pol.cfg, 2, 0), flow_sde_schedule(2, 0.2), stochastic=True,
               generator=torch.Generator().manual_seed(0))
    assert not off.enabled and graphs.captured == []
    with pytest.raises(ValueError, match="generator"):
        GraphedSampler(pol, "on", graphs=graphs).sample(_inputs(pol.cfg, 2, 0), flow_sde_schedule(2, 0.2),
                                                         stochastic=True)


# -- static prefix buffers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_suffix_written_into_the_buffers_tail_equals_concatenation(monkeypatch, variant, backend):
    pol = _policy(variant)
    if backend == "flash":
        _flash_on_cpu(monkeypatch)
    ctx = pol.encode(_inputs(pol.cfg, 3, 0))
    P, S = ctx.prefix_len, pol.cfg.suffix_len
    assert ctx.room() == S and all(k.shape[2] == P + S for k, _ in ctx.kv_buffers)
    assert all(k.data_ptr() == kb.data_ptr() for k, (kb, _) in zip(ctx.keys, ctx.kv_buffers, strict=True))
    x, t = torch.randn(3, pol.H, pol.D), torch.rand(3)
    bare = replace(ctx.index(torch.arange(3)))  # no buffers: the concatenating path
    assert bare.kv_buffers == ()
    with torch.no_grad():
        v_tail = pol.velocity(x, t, ctx)
        v_cat = pol.velocity(x, t, bare)
    assert torch.equal(v_tail, v_cat)
    head = [k.clone() for k in ctx.keys]
    with torch.no_grad():
        pol.velocity(torch.randn_like(x), t, ctx)
    assert all(torch.equal(a, b) for a, b in zip(head, ctx.keys, strict=True))  # the tail only is written
