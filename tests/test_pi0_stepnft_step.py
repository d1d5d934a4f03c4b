"""One π-StepNFT update of a tiny pi0 through the real pieces: EMA rollout copy, Flow-SDE sampling (fastnft.sde),
the reference loss (fastnft.nft), the DeepSpeed actor engine (ZeRO 0, CPU) and the EMA step (S9)."""

from __future__ import annotations

import torch

from fastnft.config import EngineConfig, TrainConfig
from fastnft.engine.ema import EMA
from fastnft.engine.zero import ActorEngine
from fastnft.nft import stepnft_loss
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import Pi0Config
from fastnft.sde import flow_sde_schedule


def test_one_stepnft_update_trains_only_the_expert():
    torch.manual_seed(0)
    pol = Pi0Policy(Pi0Config.tiny("pi0"))
    ema = EMA(pol)  # before the engine (ZeRO-3 partitions in place)
    actor = ActorEngine(pol, TrainConfig(lr=1e-2, micro_batch=4), EngineConfig(zero_stage=0, dtype="float32"))
    live = actor.module
    g = torch.Generator().manual_seed(0)
    cfg = pol.cfg
    B, N = 4, len(cfg.cameras)
    obs = {"images": torch.rand(B, N, 3, cfg.vlm.image_size, cfg.vlm.image_size, generator=g) * 2 - 1,
           "image_masks": torch.ones(B, N, dtype=torch.bool),
           "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, cfg.tokenizer_max_length), generator=g),
           "lang_masks": torch.ones(B, cfg.tokenizer_max_length, dtype=torch.bool),
           "state": torch.randn(B, cfg.max_state_dim, generator=g)}
    sch = flow_sde_schedule(cfg.num_steps, 0.2).to(dtype=torch.float32)
    rec = ema.module.sample(obs, sch, stochastic=True, generator=g)  # rollout with the EMA copy (S3 tuple)
    frozen = {n: p.detach().clone() for n, p in live.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in live.named_parameters() if p.requires_grad}
    i, C = rec.step, pol.n_action_steps
    v_theta = live(rec.x_t, sch.t[i], obs)[:, :C]  # prefix recomputed without grad, expert with grad
    y = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss = stepnft_loss(v_theta, rec.v_old[:, :C], rec.x_t[:, :C], rec.x_next[:, :C], sch.A[i], sch.B[i],
                        sch.std[i], y)
    assert torch.isfinite(loss)
    actor.train_step(loss)
    params = dict(live.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen prefix weight moved"
    moved = [n for n, v in trained.items() if not torch.equal(params[n], v)]
    assert len(moved) > len(trained) // 2, f"only {len(moved)} of {len(trained)} trainable tensors moved"
    n0 = moved[0]
    old_ema = dict(ema.module.named_parameters())[n0].detach().clone()
    ema.update(live, decay=0.5)
    assert torch.allclose(dict(ema.module.named_parameters())[n0], 0.5 * old_ema + 0.5 * params[n0].detach())
