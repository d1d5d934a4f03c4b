"""Host syncs per policy call and per rollout round (issue 16, G6 / G7), counted on CPU with
:class:`fastnft.testing.syncs.SyncCounter` (the ops that would stall the host on a GPU).

Ceilings: the K-step sampler itself adds none; a pi0 policy call on the flash path adds none either (the varlen
packing has static shapes, built from host block ids; tests/test_pi0_graphs.py counts the K-step loop alone); a
rollout round pays one check per policy
call plus a constant, whatever ``steps_per_call``. The flash path runs on CPU through the stand-in
``reference_varlen`` (its own per-sequence loop is not counted: on a GPU that is flash-attn's kernel).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fastnft.config import NFTConfig, PolicyConfig
from fastnft.envs.base import VectorEnv
from fastnft.loop.rollout import run_episodes
from fastnft.policies import attention as attention_mod
from fastnft.policies import pi0 as pi0_mod
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule, sample_actions
from fastnft.testing.syncs import SyncCounter


def _state_policy(**kw) -> StateFlowPolicy:
    torch.manual_seed(0)
    return StateFlowPolicy(3, 2, PolicyConfig(horizon=6, n_action_steps=4, width=16, depth=1, heads=2, num_steps=4,
                                              **kw)).eval()


@pytest.mark.parametrize("stochastic", [True, False])
def test_sampler_has_no_host_sync(stochastic):
    pol = _state_policy()
    obs = torch.randn(5, 3)
    g = torch.Generator().manual_seed(0)
    with SyncCounter() as syncs:
        pol.sample(obs, flow_sde_schedule(4, 0.2), stochastic=stochastic, generator=g, keep_trajectory=True)
        sample_actions(lambda x, t: x * t[:, None, None], torch.randn(5, 6, 2), flow_sde_schedule(8, 0.3),
                       stochastic=stochastic, generator=g)
    assert syncs.total == 0, syncs.report()


def _pi0_call_syncs(monkeypatch, depth: int, K: int) -> SyncCounter:
    syncs = SyncCounter()

    def varlen(q, k, v, *args, **kw):  # flash-attn's contract (16-bit) on CPU; its inner loop is not counted
        with syncs.pause():
            dt = torch.bfloat16
            return attention_mod.reference_varlen(q.to(dt), k.to(dt), v.to(dt), *args, **kw).to(q.dtype)

    monkeypatch.setattr(pi0_mod, "resolve_backend", lambda name, device: "flash")
    # the tiny model runs in fp32; varlen above casts to 16-bit as a bf16 run would, so let fp32 calls take flash
    monkeypatch.setattr(attention_mod, "flash_fits", lambda q, *kv: True)
    monkeypatch.setattr(attention_mod, "_flash_varlen", lambda: varlen)
    cfg = Pi0Config.tiny("pi0")
    cfg = replace(cfg, vlm=replace(cfg.vlm, depth=depth), expert=replace(cfg.expert, depth=depth))
    torch.manual_seed(0)
    pol = Pi0Policy(cfg).eval()
    B, N, S, L = 3, len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    lang = torch.zeros(B, L, dtype=torch.bool)
    lang[0], lang[1, :3], lang[2, :5] = True, True, True  # prompts of different lengths: padded prefixes
    masks = torch.ones(B, N, dtype=torch.bool)
    masks[1, -1] = False  # a missing camera
    inputs = {"images": torch.rand(B, N, 3, S, S) * 2 - 1, "image_masks": masks,
              "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L)) * lang, "lang_masks": lang,
              "state": torch.randn(B, cfg.max_state_dim)}
    with syncs:
        pol.sample(inputs, flow_sde_schedule(K, 0.2), stochastic=True, generator=torch.Generator().manual_seed(0))
    return syncs


def test_pi0_policy_call_on_the_flash_path_makes_no_host_sync(monkeypatch):
    """The varlen packing is built from host block ids with device ops of static shapes (issue 22): a whole policy
    call (prefix encode included) makes no host sync, at any depth and K."""
    for depth, K in ((2, 1), (4, 5)):
        syncs = _pi0_call_syncs(monkeypatch, depth=depth, K=K)
        assert syncs.total == 0, f"depth {depth}, K {K}: {syncs.report()}"


class _CountingEnv(VectorEnv):
    """Episodes of ``max_steps`` steps, never successful; obs = [seed, t, 1] (tensor ops only)."""

    def __init__(self, num_envs: int, max_steps: int):
        super().__init__()
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = num_envs, 3, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)

    def _reset(self, seeds):
        self.seeds = torch.tensor(seeds, dtype=torch.float32)
        self.t = torch.zeros(self.num_envs)
        return torch.stack([self.seeds, self.t, torch.ones(self.num_envs)], 1)

    def _step(self, actions):
        self.t += 1
        none = torch.zeros(self.num_envs, dtype=torch.bool)
        return torch.stack([self.seeds, self.t, torch.ones(self.num_envs)], 1), none.float(), none


def _round_syncs(steps_per_call: int, max_steps: int) -> tuple[SyncCounter, int]:
    syncs = SyncCounter()
    env = _CountingEnv(4, max_steps)
    real_step, real_reset = env.step_chunk, env.reset

    def step_chunk(actions):  # the env is not under test (a CPU env checks `done` per step)
        with syncs.pause():
            return real_step(actions)

    def reset(seeds):
        with syncs.pause():
            return real_reset(seeds)

    env.step_chunk, env.reset = step_chunk, reset
    with syncs:
        buf, st = run_episodes(_state_policy(), env, flow_sde_schedule(4, 0.2), [0, 1, 2, 3], stochastic=True,
                               record=True, generator=torch.Generator().manual_seed(0),
                               nft=NFTConfig(steps_per_call=steps_per_call))
    assert len(buf) == st.policy_calls * steps_per_call
    return syncs, st.policy_calls // 4


@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_rollout_round_syncs_are_one_per_call_plus_a_constant(steps_per_call):
    syncs, calls = _round_syncs(steps_per_call, max_steps=12)
    longer, calls2 = _round_syncs(steps_per_call, max_steps=24)
    assert (calls, calls2) == (3, 6)
    # one read per policy call (which episodes ended), the noise key once, one row selection at the end
    assert syncs.counts["tolist"] == calls and longer.counts["tolist"] == calls2, syncs.report()
    assert syncs.counts["int"] == 1 and syncs.counts["bool"] == 0, syncs.report()
    assert syncs.counts["mask_index"] == 1 and syncs.counts["nonzero"] == 0, syncs.report()
    assert longer.total - syncs.total == calls2 - calls, f"{syncs.report()}\n{longer.report()}"
    assert syncs.total == calls + 2, syncs.report()


def test_rollout_sync_count_is_independent_of_steps_per_call():
    one, _ = _round_syncs(1, max_steps=12)
    four, _ = _round_syncs(4, max_steps=12)
    assert one.counts == four.counts, f"{one.report()}\n{four.report()}"


def test_pi0_flash_path_with_reused_packing_equals_sdpa(monkeypatch):
    """The packing computed once per prefix gives the SDPA velocities, and reusing it changes nothing."""
    cfg = Pi0Config.tiny("pi0")
    torch.manual_seed(0)
    pol = Pi0Policy(cfg).eval()
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    B, N, S, L = 3, len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    lang = torch.zeros(B, L, dtype=torch.bool)
    lang[0], lang[1, :3], lang[2, :5] = True, True, True
    masks = torch.ones(B, N, dtype=torch.bool)
    masks[1, -1] = False
    inputs = {"images": torch.rand(B, N, 3, S, S) * 2 - 1, "image_masks": masks,
              "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L)) * lang, "lang_masks": lang,
              "state": torch.randn(B, cfg.max_state_dim)}
    x, t = torch.randn(B, cfg.chunk_size, cfg.max_action_dim), torch.rand(B)
    with torch.no_grad():
        ref = pol.model.velocity(x, t, pol.model.encode(inputs))

    def varlen(q, k, v, *args, **kw):  # flash-attn's 16-bit contract on CPU
        dt = torch.bfloat16
        return attention_mod.reference_varlen(q.to(dt), k.to(dt), v.to(dt), *args, **kw).to(q.dtype)

    monkeypatch.setattr(pi0_mod, "resolve_backend", lambda name, device: "flash")
    # the tiny model runs in fp32; varlen above casts to 16-bit as a bf16 run would, so let fp32 calls take flash
    monkeypatch.setattr(attention_mod, "flash_fits", lambda q, *kv: True)
    monkeypatch.setattr(attention_mod, "_flash_varlen", lambda: varlen)
    with torch.no_grad():
        ctx = pol.model.encode(inputs)
        v1 = pol.model.velocity(x, t, ctx)
        v2 = pol.model.velocity(x, t, ctx)
    assert len(ctx._plans) == 1 and torch.equal(v1, v2)
    assert torch.allclose(v1, ref, atol=0.05 * float(ref.abs().max()), rtol=0), (v1 - ref).abs().max()
