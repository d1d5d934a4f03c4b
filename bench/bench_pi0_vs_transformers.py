"""fastnft's pi0 against transformers' ``PI0ForConditionalGeneration``, same weights, same reduced size, one run.

    nice -n 10 python bench/bench_pi0_vs_transformers.py --json bench/pi0_vs_transformers_cpu.json

Two timings, each fastnft vs transformers 5.x (``transformers.models.pi0``, a port no one here wrote):

- policy call: prefix once, then K = 4 and 10 Euler denoising steps, batch 1 and 16. fastnft: ``Pi0Policy.sample``
  (``stochastic=False``, i.e. the Euler ODE of ``fastnft.sde``); transformers: ``sample_actions(num_steps=K)``.
  Both reuse the prefix keys / values across the K steps (transformers keeps them in a ``DynamicCache`` that it crops
  after each step; fastnft in the static buffers of a
  :class:`fastnft.policies.pi0.PrefixContext`).
- where the policy call's time goes, per batch: the prefix alone (SigLIP + the language model's keys / values) and
  one denoising step over the cached prefix (transformers: ``forward(cache=...)`` and the cache crop).
- training step (batch 16): fastnft's StepNFT update step on one micro-batch (velocity of the current policy,
  ``fastnft.nft.stepnft_loss``, backward), with the prefix recomputed without grad (``prefix_mode: recompute``, the
  default) and served from the stored context (``prefix_mode: cached``); transformers: ``forward(actions=...)`` (its
  flow-matching MSE) and backward. Only the expert and its projections train in both (the PaliGemma prefix is
  frozen: ``requires_grad_(False)``), so no prefix gradients are computed in either.

Same weights: fastnft's state dict is copied into the transformers model by name (``paligemma.model.*`` ->
``model.vlm.*``, ``gemma_expert.model.*`` -> ``model.dit.*``, the projections -> ``embed_action_time.*``), and the
run checks that both give the same actions from the same noise (``max_abs_diff_actions`` in the JSON). float32,
CPU, ``sdpa`` attention in both. Each timing alternates the two implementations (fastnft, transformers, fastnft, ...)
so machine load hits both alike; medians of ``--reps`` after one warm-up call each; one torch thread by default.

The size is reduced (sizes in the JSON): the prefix language model keeps pi0's ratio of width to the expert's
(2 : 1), three cameras and a 48-token prompt; everything is smaller so that a 2-core CPU finishes in minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastnft.nft import stepnft_loss
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import ExpertConfig, Pi0Config, VLMConfig
from fastnft.sde import flow_sde_schedule

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def reduced_config() -> Pi0Config:
    """pi0 at reduced size: prefix LM 256 wide (pi0: 2048), expert 128 (pi0: 1024), 4 layers each, head dim 64,
    one KV head; SigLIP 112 px / patch 14 -> 64 tokens per camera; P = 3 x 64 + 48 = 240 prefix tokens."""
    vlm = VLMConfig(image_size=112, patch_size=14, vision_width=128, vision_depth=2, vision_mlp_dim=512,
                    vision_heads=2, width=256, depth=4, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64,
                    vocab_size=1024)
    expert = ExpertConfig(width=128, depth=4, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=64)
    return Pi0Config(variant="pi0", vlm=vlm, expert=expert, chunk_size=50, n_action_steps=50, max_action_dim=32,
                     max_state_dim=32, action_dim=7, state_dim=8, cameras=CAMERAS, tokenizer_max_length=48,
                     num_steps=10, vlm_dtype="float32", attention="sdpa")


def transformers_twin(pol: Pi0Policy):
    """transformers' PI0ForConditionalGeneration of the same size, holding the policy's weights."""
    from transformers import PI0Config, PI0ForConditionalGeneration

    c, v, e = pol.cfg, pol.cfg.vlm, pol.cfg.expert
    hf_cfg = PI0Config(
        vlm_config={"model_type": "paligemma", "image_token_id": v.vocab_size - 1, "projection_dim": v.width,
                    "text_config": {"model_type": "gemma", "hidden_size": v.width, "num_hidden_layers": v.depth,
                                    "intermediate_size": v.mlp_dim, "num_attention_heads": v.num_heads,
                                    "num_key_value_heads": v.num_kv_heads, "head_dim": v.head_dim,
                                    "vocab_size": v.vocab_size, "rms_norm_eps": v.rms_norm_eps},
                    "vision_config": {"model_type": "siglip_vision_model", "hidden_size": v.vision_width,
                                      "intermediate_size": v.vision_mlp_dim, "num_hidden_layers": v.vision_depth,
                                      "num_attention_heads": v.vision_heads, "patch_size": v.patch_size,
                                      "image_size": v.image_size, "vision_use_head": False,
                                      "projection_dim": v.width}},
        dit_config={"model_type": "gemma", "hidden_size": e.width, "num_hidden_layers": e.depth,
                    "intermediate_size": e.mlp_dim, "num_attention_heads": e.num_heads,
                    "num_key_value_heads": e.num_kv_heads, "head_dim": e.head_dim, "rms_norm_eps": v.rms_norm_eps},
        chunk_size=c.chunk_size, max_state_dim=c.max_state_dim, max_action_dim=c.max_action_dim,
        num_inference_steps=c.num_steps, min_period=c.min_period, max_period=c.max_period)
    hf_cfg._attn_implementation = "sdpa"
    model = PI0ForConditionalGeneration(hf_cfg).eval()
    ours = pol.model.state_dict()
    mapped = {}
    for k, t in ours.items():
        if k.startswith("paligemma_with_expert.paligemma.model."):
            mapped["model.vlm." + k.removeprefix("paligemma_with_expert.paligemma.model.")] = t
        elif k.startswith("paligemma_with_expert.gemma_expert.model."):
            mapped["model.dit." + k.removeprefix("paligemma_with_expert.gemma_expert.model.")] = t
        elif k.split(".")[0] in ("action_in_proj", "state_proj", "action_time_mlp_in", "action_time_mlp_out"):
            mapped["embed_action_time." + k] = t
        elif k.startswith("action_out_proj."):
            mapped[k] = t
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith("model.dit.embed_tokens")]  # the DiT's unused embedding
    if missing or unexpected:
        raise RuntimeError(f"weight copy into transformers' PI0 failed: missing {missing}, unexpected {unexpected}")
    model.model.vlm.requires_grad_(False)
    return model


def inputs(cfg: Pi0Config, B: int, seed: int = 0) -> tuple[dict, dict]:
    """Processed inputs for fastnft and the same tensors in transformers' layout (image placeholder tokens)."""
    g = torch.Generator().manual_seed(seed)
    N, S, L, v = len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length, cfg.vlm
    images = torch.rand(B, N, 3, S, S, generator=g) * 2 - 1
    lang = torch.randint(1, v.vocab_size - 1, (B, L), generator=g)
    state = torch.randn(B, cfg.max_state_dim, generator=g)
    ours = {"images": images, "image_masks": torch.ones(B, N, dtype=torch.bool), "lang_tokens": lang,
            "lang_masks": torch.ones(B, L, dtype=torch.bool), "state": state}
    img_ids = torch.full((B, N * v.tokens_per_image), v.vocab_size - 1)
    ids = torch.cat([img_ids, lang], 1)
    theirs = {"state": state, "input_ids": ids, "pixel_values": images, "attention_mask": torch.ones_like(ids),
              "pixel_attention_mask": torch.ones(B, N, dtype=torch.bool)}
    return ours, theirs


def timed_pair(fn_a, fn_b, reps: int) -> tuple[list[float], list[float]]:
    """One warm-up call each, then ``reps`` alternating timed calls."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, acc in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return ta, tb


def row(name: str, ta: list[float], tb: list[float], **extra) -> dict:
    ma, mb = statistics.median(ta), statistics.median(tb)
    return {"case": name, **extra, "fastnft_s_median": ma, "transformers_s_median": mb, "speedup": mb / ma,
            "fastnft_s_all": ta, "transformers_s_all": tb}


def same_actions(pol: Pi0Policy, hf, cfg: Pi0Config) -> tuple[float, float]:
    """Max |actions difference| after 10 Euler steps from the same noise (batch 2): as is (fastnft's float64 time
    embedding), and with fastnft's time embedding swapped for transformers' float32 one (``PI0TimestepEmbeddings``)
    to show that it is the only difference."""
    import fastnft.policies.pi0 as pi0_module

    ours, theirs = inputs(cfg, 2)
    noise = torch.randn(2, cfg.chunk_size, cfg.max_action_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = hf.sample_actions(noise=noise.clone(), num_steps=10, **theirs)

    def euler() -> torch.Tensor:
        ctx = pol.encode(ours)
        with torch.no_grad():
            x = noise.clone()
            for k in range(10):
                x = x - 0.1 * pol.velocity(x, torch.full((2,), 1.0 - k / 10), ctx)
        return x

    def float32_embedding(t, dim, min_period, max_period, compute_dtype=None):
        frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float32)
        freq = 1.0 / (min_period * (max_period / min_period) ** frac) * 2 * math.pi
        e = freq[None, :] * t[:, None]
        return torch.cat([e.sin(), e.cos()], 1)

    as_is = (euler() - y).abs().max().item()
    real = pi0_module.sinusoidal_time_embedding
    pi0_module.sinusoidal_time_embedding = float32_embedding
    try:
        swapped = (euler() - y).abs().max().item()
    finally:
        pi0_module.sinusoidal_time_embedding = real
    return as_is, swapped


def _show(r: dict) -> None:
    print(json.dumps({k: v for k, v in r.items() if not k.endswith("_all")}), flush=True)


def bench_policy_call(pol: Pi0Policy, hf, cfg: Pi0Config, B: int, steps: list[int], reps: int) -> list[dict]:
    """Rows ``prefix``, ``denoise_step`` and ``policy_call`` (one per K) at batch B."""
    ours, theirs = inputs(cfg, B)
    am = theirs["attention_mask"]

    def hf_prefix():
        with torch.no_grad():
            emb = hf.model.embed_prefix(theirs["input_ids"], theirs["pixel_values"], theirs["pixel_attention_mask"])
            return hf.model.vlm(inputs_embeds=emb, attention_mask=am, position_ids=am.cumsum(-1) - 1,
                                token_type_ids=torch.zeros_like(emb[:, :, 0]), use_cache=True).cache

    rows = [row("prefix", *timed_pair(lambda: pol.encode(ours), hf_prefix, reps), batch=B)]
    _show(rows[-1])
    ctx, cache = pol.encode(ours), hf_prefix()
    n_pre = cache.get_seq_length()
    xs = torch.randn(B, cfg.chunk_size, cfg.max_action_dim)
    ts = torch.full((B,), 0.5)

    def hf_step():
        with torch.no_grad():
            out = hf(state=theirs["state"], noise=xs, timestep=ts, attention_mask=am,
                     pixel_attention_mask=theirs["pixel_attention_mask"], cache=cache)
        cache.crop(n_pre - cache.get_seq_length())  # back to the prefix, as sample_actions does
        return out

    def our_step():
        with torch.no_grad():
            return pol.velocity(xs, ts, ctx)

    rows.append(row("denoise_step", *timed_pair(our_step, hf_step, reps), batch=B))
    _show(rows[-1])
    for K in steps:
        sch = flow_sde_schedule(K, 0.0)
        noise = torch.randn(B, cfg.chunk_size, cfg.max_action_dim)
        ta, tb = timed_pair(lambda sch=sch: pol.sample(ours, sch, stochastic=False),
                            lambda K=K, noise=noise: hf.sample_actions(noise=noise, num_steps=K, **theirs), reps)
        rows.append(row("policy_call", ta, tb, batch=B, steps=K))
        _show(rows[-1])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 10])
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared, loaded machine two spinning threads time contention)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    torch.manual_seed(0)
    cfg = reduced_config()
    pol = Pi0Policy(cfg).eval()
    with torch.no_grad():  # a trained-looking expert (a fresh one has zero norm gains only)
        for p in pol.trainable_parameters():
            p.normal_(0, 0.05)
    hf = transformers_twin(pol)

    max_diff, max_diff_f32 = same_actions(pol, hf, cfg)

    rows = []
    for B in a.batches:
        rows += bench_policy_call(pol, hf, cfg, B, a.steps, a.reps)

    # training step
    B = a.train_batch
    ours, theirs = inputs(cfg, B, seed=1)
    g = torch.Generator().manual_seed(2)
    H, D = cfg.chunk_size, cfg.max_action_dim
    sch = flow_sde_schedule(10, 0.2)
    i = torch.randint(0, 10, (B,), generator=g)
    A_, B_, std, t_i = sch.A[i].float(), sch.B[i].float(), sch.std[i].float(), sch.t[i].float()
    x_t, v_old, actions = (torch.randn(B, H, D, generator=g) for _ in range(3))
    x_next = A_[:, None, None] * x_t + B_[:, None, None] * v_old + std[:, None, None] * torch.randn(B, H, D,
                                                                                                     generator=g)
    y = 2 * torch.randint(0, 2, (B,), generator=g).float() - 1
    stored = pol.encode(ours)
    pol.train()
    hf.train()
    tr_ours = pol.trainable_parameters()
    tr_hf = [p for p in hf.parameters() if p.requires_grad]

    def step_ours(obs):
        for p in tr_ours:
            p.grad = None
        v = pol(x_t, t_i, obs)
        stepnft_loss(v, v_old, x_t, x_next, A_, B_, std, y).backward()

    def step_hf():
        for p in tr_hf:
            p.grad = None
        hf(noise=x_t, timestep=t_i, actions=actions, **theirs).loss.backward()

    for mode, obs in (("recompute", ours), ("cached", stored)):
        ta, tb = timed_pair(lambda obs=obs: step_ours(obs), step_hf, a.reps)
        rows.append(row("train_step", ta, tb, batch=B, prefix_mode=mode))
        _show(rows[-1])

    n = lambda mod: sum(p.numel() for p in mod.parameters())
    out = {
        "what": "fastnft pi0 vs transformers PI0ForConditionalGeneration, same weights, reduced size, float32, CPU",
        "command": "nice -n 10 python bench/bench_pi0_vs_transformers.py " + " ".join(sys.argv[1:]),
        "device": f"{platform.machine()} ({torch.get_num_threads()} threads)", "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "loadavg_1m_before_after": [load0, os.getloadavg()[0]], "reps": a.reps,
        "sizes": {"prefix_tokens": cfg.prefix_len, "suffix_tokens": cfg.suffix_len, "chunk_size": cfg.chunk_size,
                  "vlm_width": cfg.vlm.width, "vlm_depth": cfg.vlm.depth, "vlm_mlp_dim": cfg.vlm.mlp_dim,
                  "expert_width": cfg.expert.width, "expert_mlp_dim": cfg.expert.mlp_dim,
                  "vision_width": cfg.vlm.vision_width, "vision_depth": cfg.vlm.vision_depth,
                  "image_size": cfg.vlm.image_size, "cameras": len(cfg.cameras),
                  "prefix_lm_params": n(pol.model.vlm.model.language_model),
                  "vision_params": n(pol.model.vlm.model.vision_tower), "expert_params": n(pol.model.expert)},
        "goal_policy_call_speedup": 1.5,  # issue 15, part 7
        "max_abs_diff_actions_k10": max_diff,
        "max_abs_diff_actions_k10_float32_time_embedding": max_diff_f32, "rows": rows, "wall_s": time.perf_counter() - t_start,
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if a.json:
        from fastnft.atomic import write_json_atomic

        write_json_atomic(a.json, out, indent=2)


if __name__ == "__main__":
    main()
