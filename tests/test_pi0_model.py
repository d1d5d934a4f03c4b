"""pi0 / pi0.5 network on tiny configs (CPU, float32): prefix cache vs joint forward, masks, gradients, time input."""

from __future__ import annotations

import pytest
import torch

from fastnft.policies.attention import attend, block_mask, flash_available, reference_varlen
from fastnft.policies.base import FlowPolicy
from fastnft.policies.pi0 import Pi0Policy, PrefixContext
from fastnft.policies.pi0_config import Pi0Config
from fastnft.sde import flow_sde_schedule

VARIANTS = ["pi0", "pi05"]


def _policy(variant: str, seed: int = 0, **kw) -> Pi0Policy:
    torch.manual_seed(seed)
    pol = Pi0Policy(Pi0Config.tiny(variant, **kw))
    # a fresh adaRMSNorm is a plain RMSNorm (zero-initialised modulation): give every trained tensor values, as a
    # trained checkpoint has, so the time path and the gates are exercised
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    return pol.eval()


def _inputs(cfg: Pi0Config, B: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    N, S, L = len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    masks = torch.ones(B, N, dtype=torch.bool)
    masks[1, -1] = False  # a missing camera
    lang = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate([L, 3, 5][:B]):
        lang[b, :n] = True  # prompts of different lengths (right padding)
    return {"images": torch.rand(B, N, 3, S, S, generator=g) * 2 - 1, "image_masks": masks,
            "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L), generator=g) * lang, "lang_masks": lang,
            "state": torch.randn(B, cfg.max_state_dim, generator=g)}


def _xt(cfg: Pi0Config, B: int = 3, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g), torch.rand(B, generator=g)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_prefix_velocity_equals_joint_forward(variant):
    pol = _policy(variant)
    inp = _inputs(pol.cfg)
    x, t = _xt(pol.cfg)
    v_cached = pol.velocity(x, t, pol.encode(inp))
    v_joint = pol.model.joint_velocity(inp, x, t)
    err = (v_cached - v_joint).abs().max().item()
    assert v_cached.shape == (3, pol.H, pol.D) and v_cached.dtype == torch.float32
    assert err < 1e-5, f"cached-prefix velocity differs from the joint forward by {err:.3g}"
    assert v_cached.abs().mean() > 1e-2  # not a degenerate all-zero output


@pytest.mark.parametrize("variant", VARIANTS)
def test_suffix_never_changes_the_prefix(variant):
    pol = _policy(variant)
    inp = _inputs(pol.cfg)
    x, t = _xt(pol.cfg)
    v1, hp1 = pol.model.joint_velocity(inp, x, t, return_prefix=True)
    inp2 = dict(inp, state=inp["state"] + 1.0)
    x2 = x.clone()
    x2[:, 0] += 3.0  # change one action token
    v2, hp2 = pol.model.joint_velocity(inp2, x2, 1 - t, return_prefix=True)
    assert torch.equal(hp1, hp2), "a suffix token leaked into a prefix output"
    assert not torch.allclose(v1, v2)  # the suffix did change (the test could fail)


def test_prefix_cache_matches_transformers_gemma():
    """Our layer loop over the PaliGemma weights equals transformers' Gemma with a bidirectional mask."""
    pol = _policy("pi0")
    lm = pol.model.vlm.model.language_model
    with torch.no_grad():  # large weights, so that attention visibly changes the next layer's keys
        for p in lm.parameters():
            p.normal_(0, 0.3)
    emb = torch.randn(2, 9, pol.cfg.vlm.width)
    ctx = pol.model.prefix_cache(emb, torch.ones(2, 9, dtype=torch.bool))
    with torch.no_grad():
        full = lm(inputs_embeds=emb, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool), use_cache=True)
        tril = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9)
        causal = lm(inputs_embeds=emb, attention_mask=tril, use_cache=True)
    last = len(ctx.keys) - 1
    for li in range(len(ctx.keys)):
        assert torch.allclose(full.past_key_values.layers[li].keys, ctx.keys[li], atol=1e-5)
        assert torch.allclose(full.past_key_values.layers[li].values, ctx.values[li], atol=1e-5)
    # the reference does honour the mask: a causal prefix gives other keys from layer 1 on
    assert not torch.allclose(causal.past_key_values.layers[last].keys, ctx.keys[last], atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_context_is_reused_and_never_grows(variant, monkeypatch):
    pol = _policy(variant)
    inp = _inputs(pol.cfg)
    calls = {"prefix": 0, "velocity": 0}
    real_prefix, real_velocity = pol.model.prefix_cache, pol.model.velocity
    seen: list[PrefixContext] = []

    def count_prefix(*a, **k):
        calls["prefix"] += 1
        return real_prefix(*a, **k)

    def count_velocity(x, t, ctx):
        calls["velocity"] += 1
        seen.append(ctx)
        return real_velocity(x, t, ctx)

    monkeypatch.setattr(pol.model, "prefix_cache", count_prefix)
    monkeypatch.setattr(pol.model, "velocity", count_velocity)
    sch = flow_sde_schedule(pol.cfg.num_steps, 0.2)
    rec = pol.sample(inp, sch, stochastic=True, generator=torch.Generator().manual_seed(0))
    K = pol.cfg.num_steps
    assert calls == {"prefix": 1, "velocity": K}
    assert all(c is seen[0] for c in seen)
    P = pol.cfg.prefix_len
    assert all(k.shape[2] == P for k in seen[0].keys), "the prefix cache grew during the K steps"
    assert rec.actions.shape == (3, pol.H, pol.D) and torch.isfinite(rec.actions).all()
    # a stored context samples the same chunk as the raw observation (prefix_mode = cached)
    rec2 = pol.sample(seen[0], sch, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rec.actions, rec2.actions) and calls["prefix"] == 1
    # same context, same input -> same velocity (nothing was written into the cache)
    x, t = _xt(pol.cfg)
    before = [k.clone() for k in seen[0].keys]
    assert torch.equal(real_velocity(x, t, seen[0]), real_velocity(x, t, seen[0]))
    assert all(torch.equal(a, b) for a, b in zip(before, seen[0].keys))


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_only_trainable_parameters(variant):
    pol = _policy(variant).train()
    inp = _inputs(pol.cfg)
    x, t = _xt(pol.cfg)
    pol(x, t, inp).square().mean().backward()  # prefix recomputed without grad (prefix_mode = recompute)
    trainable = {n for n, p in pol.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("model.paligemma_with_expert.paligemma.") for n in trainable)
    assert {id(p) for p in pol.trainable_parameters()} == {id(p) for n, p in pol.named_parameters() if n in trainable}
    for n, p in pol.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
        else:
            assert p.grad is None, f"frozen parameter {n} received a gradient"
    no_grad = [n for n, p in pol.named_parameters() if n in trainable and p.grad.abs().sum() == 0]
    assert not no_grad, f"trainable parameters without gradient: {no_grad}"
    assert not pol.model.vlm.training  # frozen prefix stays in eval mode under .train()


@pytest.mark.parametrize("variant", VARIANTS)
def test_time_conditioning_changes_the_output(variant):
    pol = _policy(variant)
    ctx = pol.encode(_inputs(pol.cfg))
    x, _ = _xt(pol.cfg)
    v = [pol.velocity(x, torch.full((3,), tt), ctx) for tt in (0.1, 0.5, 0.9)]
    assert (v[0] - v[1]).abs().max() > 1e-3 and (v[1] - v[2]).abs().max() > 1e-3


def test_pi05_has_no_state_token_and_pi0_uses_the_state():
    p0, p5 = _policy("pi0"), _policy("pi05")
    assert hasattr(p0.model, "state_proj") and not hasattr(p5.model, "state_proj")
    assert hasattr(p5.model, "time_mlp_in") and not hasattr(p5.model, "action_time_mlp_in")
    for pol, changes in ((p0, True), (p5, False)):
        inp = _inputs(pol.cfg)
        x, t = _xt(pol.cfg)
        va = pol.velocity(x, t, pol.encode(inp))
        vb = pol.velocity(x, t, pol.encode(dict(inp, state=inp["state"] + 1)))
        assert (not torch.equal(va, vb)) == changes, pol.cfg.variant


def test_bf16_prefix_with_fp32_expert_runs():
    pol = _policy("pi0", vlm_dtype="bfloat16")
    assert pol.model.vlm.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert pol.model.action_in_proj.weight.dtype == torch.float32
    ctx = pol.encode(_inputs(pol.cfg))
    assert ctx.keys[0].dtype == torch.bfloat16
    x, t = _xt(pol.cfg)
    v = pol.velocity(x, t, ctx)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_policy_satisfies_flow_policy_protocol_and_to_env_actions():
    pol = _policy("pi0")
    assert isinstance(pol, FlowPolicy)
    x = torch.randn(2, pol.H, pol.D)
    assert pol.to_env_actions(x).shape == (2, pol.H, pol.cfg.action_dim)
    assert torch.equal(pol.normalize_actions(pol.to_env_actions(x))[..., : pol.act_dim], x[..., : pol.act_dim])


def test_prefix_context_index_and_nbytes():
    pol = _policy("pi0")
    ctx = pol.encode(_inputs(pol.cfg))
    sub = ctx.index(torch.tensor([2, 0]))
    assert sub.batch_size == 2 and torch.equal(sub.keys[1][0], ctx.keys[1][2])
    both = PrefixContext.cat([sub, ctx.index(torch.tensor([1]))])
    assert both.batch_size == 3 and torch.equal(both.values[0][2], ctx.values[0][1])
    x, t = _xt(pol.cfg, B=3)
    # a micro-batch served from stored contexts gives the same velocities as recomputing the prefix
    order = torch.tensor([2, 0, 1])
    assert torch.allclose(pol(x, t, both), pol(x, t, {k: v[order] for k, v in _inputs(pol.cfg).items()}), atol=1e-6)
    assert ctx.nbytes() == pol.cfg.prefix_cache_bytes(bytes_per_value=4) * 3 + ctx.valid.numel() + ctx.state.numel() * 4


@pytest.mark.parametrize("with_padding", [False, True])
def test_flash_blockwise_decomposition_equals_dense_mask(with_padding):
    """The flash backend's per-block varlen packing, run with a CPU varlen reference, equals masked SDPA."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, hd, P = 3, 4, 1, 8, 7
    q_block = torch.tensor([0] * P + [1] + [2] * 5)
    k_block = q_block.clone()
    S = len(q_block)
    valid = torch.ones(B, S, dtype=torch.bool)
    if with_padding:
        valid[1, 4:P] = False
        valid[2, 0:P] = False  # a sample with an empty prefix
    # bf16 inputs: flash-attn 2 (and its strict CPU stand-in) takes fp16 / bf16 only
    q = torch.randn(B, Hq, S, hd, generator=g).bfloat16()
    k, v = torch.randn(B, Hkv, S, hd, generator=g).bfloat16(), torch.randn(B, Hkv, S, hd, generator=g).bfloat16()
    dense = attend(q.float(), k.float(), v.float(), q_block, k_block, valid, "sdpa")
    blockwise = attend(q, k, v, q_block, k_block, valid, "flash", varlen_fn=reference_varlen)
    assert blockwise.dtype == torch.bfloat16
    rows = valid  # padded queries have unused outputs
    assert torch.allclose(dense[rows], blockwise[rows].float(), atol=2e-2)  # bf16 output rounding
    m = block_mask(q_block, k_block, valid)
    assert not m[0, :P, P:].any() and m[0, P + 1:, :].all()  # prefix never sees the suffix; actions see all
    assert m[0, P, : P + 1].all() and not m[0, P, P + 1:].any()  # pi0's state token: prefix + itself, no actions


def test_flash_contract_is_enforced_and_auto_picks_per_call():
    """flash-attn 2 takes fp16/bf16 only (head dim <= 256, int32 cu_seqlens): the CPU stand-in refuses the rest,
    an explicit ``flash`` backend names the fix, and ``auto`` runs such calls with SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8, generator=g) for _ in range(3))
    blk, valid = torch.zeros(5, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    flat = q.transpose(1, 2).reshape(10, 2, 8)
    with pytest.raises(RuntimeError, match="fp16 and bf16"):
        reference_varlen(flat, flat, flat, cu, cu, 5, 5)
    with pytest.raises(RuntimeError, match="int32"):
        reference_varlen(flat.bfloat16(), flat.bfloat16(), flat.bfloat16(), cu.long(), cu, 5, 5)
    wide = torch.zeros(10, 1, 264, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="head dimension"):
        reference_varlen(wide, wide, wide, cu, cu, 5, 5)
    with pytest.raises(ValueError, match="engine.dtype: bfloat16"):
        attend(q, k, v, blk, blk, valid, "flash", varlen_fn=reference_varlen)
    calls = []

    def counting(*a, **kw):
        calls.append(a[0].dtype)
        return reference_varlen(*a, **kw)

    import fastnft.policies.attention as att

    fp32 = attend(q, k, v, blk, blk, valid, "auto", varlen_fn=counting)
    assert calls == [] and torch.equal(fp32, attend(q, k, v, blk, blk, valid, "sdpa"))
    attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), blk, blk, valid, "auto", varlen_fn=counting)
    assert calls == [torch.bfloat16]
    assert att.flash_fits(q.half()) and not att.flash_fits(q) and not att.flash_fits(wide)
    assert not att.flash_fits(q.bfloat16(), k, v)  # mixed dtypes: flash-attn takes one dtype


@pytest.mark.parametrize("vlm_dtype,precision", [("float32", "float32"), ("bfloat16", "float32"),
                                                 ("bfloat16", "bfloat16"), ("float32", "bfloat16")])
def test_pi0_attention_auto_on_a_flash_host(monkeypatch, vlm_dtype, precision):
    """pi0 with ``attention: auto`` where flash-attn is installed (flash-attn replaced by its strict CPU stand-in):
    fp32 calls (``engine.dtype: float32``) take SDPA, bf16 calls take flash-attn, and the velocity equals SDPA's.
    Before the per-call rule, ``auto`` sent fp32 q/k/v to flash-attn, which rejects them."""
    import fastnft.policies.attention as att

    calls = []

    def strict_varlen(*a, **kw):
        calls.append(a[0].dtype)
        return reference_varlen(*a, **kw)

    pol_s = _policy("pi0", attention="sdpa", vlm_dtype=vlm_dtype).set_precision(precision)
    pol_a = _policy("pi0", attention="auto", vlm_dtype=vlm_dtype).set_precision(precision)
    inp = _inputs(pol_s.cfg)
    x, t = _xt(pol_s.cfg)
    ref = pol_s.velocity(x, t, pol_s.encode(inp))
    monkeypatch.setattr(att, "flash_available", lambda device: True)
    monkeypatch.setattr(att, "_flash_varlen", lambda: strict_varlen)
    v = pol_a.velocity(x, t, pol_a.encode(inp))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    if vlm_dtype == precision == "float32":
        assert calls == []  # every call fp32: SDPA
    else:
        assert calls and set(calls) == {torch.bfloat16}  # the bf16 prefix (and the bf16 expert) on flash-attn
    tol = 1e-5 if vlm_dtype == precision == "float32" else 5e-2
    assert torch.allclose(v, ref, atol=tol, rtol=tol), (v - ref).abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not flash_available("cuda"), reason="needs a CUDA device and flash-attn (the gpu extra)")
def test_flash_attn_matches_sdpa_on_gpu():
    torch.manual_seed(0)
    pol_s = Pi0Policy(Pi0Config.tiny("pi0", attention="sdpa", vlm_dtype="bfloat16")).cuda().eval()
    pol_f = Pi0Policy(Pi0Config.tiny("pi0", attention="flash", vlm_dtype="bfloat16")).cuda().eval()
    pol_f.load_state_dict(pol_s.state_dict())
    inp = {k: v.cuda() for k, v in _inputs(pol_s.cfg).items()}
    x, t = (a.cuda() for a in _xt(pol_s.cfg))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vs = pol_s.velocity(x, t, pol_s.encode(inp))
        vf = pol_f.velocity(x, t, pol_f.encode(inp))
    assert torch.allclose(vs, vf, atol=3e-2, rtol=3e-2)  # bf16: ~3 significant digits per op


def test_ema_copy_shares_the_frozen_prefix_and_averages_only_the_expert():
    from fastnft.engine.ema import EMA

    pol = _policy("pi0")
    ema = EMA(pol)
    live, avg = dict(pol.named_parameters()), dict(ema.module.named_parameters())
    frozen = [n for n, p in live.items() if not p.requires_grad]
    assert frozen and all(avg[n] is live[n] for n in frozen)  # shared, not duplicated
    assert sorted(ema.names) == sorted(n for n, p in live.items() if p.requires_grad)
    assert all(avg[n] is not live[n] and torch.equal(avg[n], live[n]) for n in ema.names)
    before = {n: live[n].clone() for n in frozen[:3]}
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.add_(1.0)
    ema.update(pol, decay=0.5)
    n0 = ema.names[0]
    assert torch.allclose(avg[n0], live[n0] - 0.5)  # theta_ema = 0.5 theta_ema + 0.5 theta (S9)
    assert all(torch.equal(live[n], before[n]) for n in before)
