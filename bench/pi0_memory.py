"""GPU memory of a pi0 update step, counted from parameter, optimizer-state and activation sizes.

    python bench/pi0_memory.py --json bench/pi0_memory.json        # CPU is enough: nothing runs at full size

What is counted, per GPU, for a micro-batch of M policy calls (default 128) with ZeRO stage 0-3 on N GPUs:

* parameters: exact counts from the real module tree of :class:`fastnft.policies.pi0.Pi0Model`, built on the meta
  device (no memory, no weights);
* frozen prefix (PaliGemma: SigLIP + projector + Gemma 2B), bf16, replicated on every GPU (ZeRO covers only the
  trainable parameters);
* trained expert + projections, Psi parameters, mixed-precision Adam in the ZeRO paper's accounting: bf16 weights
  2 Psi, bf16 gradients 2 Psi, fp32 master weights + Adam moments 12 Psi; stage 1 shards the 12 Psi, stage 2 also
  the gradients, stage 3 also the bf16 weights (divide by N);
* prefix keys/values of the micro-batch (bf16, held through the expert's forward and backward);
* expert activations saved for backward: MEASURED with ``torch.autograd.graph.saved_tensors_hooks`` on a bf16
  forward of the pi0-size expert on CPU at batch 1 and 2 (per-sample bytes = the difference; parameters and the
  prefix cache excluded), times M;
* the prefix recompute's transient (no grad, before the expert's forward; freed after): counted as the largest
  live set of one Gemma 2B layer, the MLP's gate, up and product ``3 * M * P * mlp_dim`` bf16 values, plus the
  residual stream ``M * P * width``; SigLIP's transient is smaller at pi0 size (both are printed).

Peak per GPU = frozen prefix + model states + prefix KV + max(prefix transient, expert activations). Not counted:
CUDA context and allocator fragmentation (~1-3 GB), DeepSpeed's communication buckets, the rollout buffer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _pi0_bench_model import expert_model, pi0_config, synthetic_context

from fastnft.policies.pi0 import Pi0Model

GB = 1e9


def param_counts(variant: str) -> dict[str, int]:
    """Exact parameter counts per part of the full-size model (meta device)."""
    cfg = pi0_config(variant)
    with torch.device("meta"):
        m = Pi0Model(cfg)
    parts = {"vision_tower": m.vlm.model.vision_tower, "projector": m.vlm.model.multi_modal_projector,
             "language_model": m.vlm.model.language_model, "expert": m.expert}
    out = {k: sum(p.numel() for p in mod.parameters()) for k, mod in parts.items()}
    out["frozen"] = sum(p.numel() for p in m.parameters() if not p.requires_grad)
    out["trainable"] = sum(p.numel() for p in m.parameters() if p.requires_grad)
    out["projections"] = out["trainable"] - out["expert"]
    return out


def saved_bytes(variant: str, batch: int) -> dict[str, int]:
    """Bytes of the distinct tensors autograd saves in one bf16 expert forward (parameters and prefix excluded)."""
    model, full = expert_model(variant, torch.bfloat16, "cpu")
    model.train()
    ctx = synthetic_context(full, batch)
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    exclude |= {t.untyped_storage().data_ptr() for t in (*ctx.keys, *ctx.values)}
    seen: dict[int, int] = {}
    attn_like = {"bytes": 0}
    S, P = full.suffix_len, full.prefix_len

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in exclude and ptr not in seen:
            seen[ptr] = st.nbytes()
            if t.dim() == 4 and t.shape[-2:] == (S, S + P):  # attention probabilities (backend-dependent)
                attn_like["bytes"] += st.nbytes()
        return t

    x = torch.randn(batch, full.chunk_size, full.max_action_dim)
    t = torch.rand(batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.velocity(x, t, ctx)
    return {"total": sum(seen.values()), "attention_probs": attn_like["bytes"]}


def table(variant: str, micro_batch: int, gpus: list[int]) -> dict:
    cfg = pi0_config(variant)
    n = param_counts(variant)
    s1, s2 = saved_bytes(variant, 1), saved_bytes(variant, 2)
    act_per_sample = s2["total"] - s1["total"]
    probs_per_sample = s2["attention_probs"] - s1["attention_probs"]
    M, P, v = micro_batch, cfg.prefix_len, cfg.vlm
    psi = n["trainable"]
    frozen = 2 * n["frozen"]
    kv = cfg.prefix_cache_bytes(2) * M
    act = act_per_sample * M
    lm_transient = (3 * M * P * v.mlp_dim + M * P * v.width) * 2
    n_img = M * len(cfg.cameras)
    vis_transient = (3 * n_img * v.tokens_per_image * v.vision_mlp_dim) * 2
    prefix_transient = max(lm_transient, vis_transient)
    rows = []
    for N in gpus:
        for stage in (0, 1, 2, 3):
            w = 2 * psi / (N if stage >= 3 else 1)
            g = 2 * psi / (N if stage >= 2 else 1)
            o = 12 * psi / (N if stage >= 1 else 1)
            states = w + g + o
            peak = frozen + states + kv + max(prefix_transient, act)
            rows.append({"gpus": N, "zero_stage": stage, "bf16_weights_gb": w / GB, "grads_gb": g / GB,
                         "master_and_adam_gb": o / GB, "model_states_gb": states / GB, "peak_gb": peak / GB,
                         "fits_80gb": peak < 80 * GB})
    return {
        "variant": variant, "micro_batch": M, "prefix_tokens": P, "suffix_tokens": cfg.suffix_len,
        "cameras": list(cfg.cameras), "params": n,
        "frozen_prefix_bf16_gb": frozen / GB, "prefix_kv_cache_gb": kv / GB,
        "prefix_kv_bytes_per_call": cfg.prefix_cache_bytes(2),
        "expert_activations_gb": act / GB, "expert_activation_bytes_per_sample": act_per_sample,
        "attention_probs_bytes_per_sample_cpu": probs_per_sample,
        "prefix_recompute_transient_gb": prefix_transient / GB, "lm_layer_transient_gb": lm_transient / GB,
        "siglip_layer_transient_gb": vis_transient / GB,
        "rows": rows,
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="pi0", choices=["pi0", "pi05"])
    ap.add_argument("--micro-batch", type=int, default=128)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    out = table(a.variant, a.micro_batch, a.gpus)
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
