"""Builders shared by the pi0 benchmarks: a pi0-size action expert over a synthetic prefix cache.

The expert's cost does not depend on what produced the prefix keys and values, so the benchmarks keep the expert,
its projections and the attention layout at pi0 size (1024 wide, 18 layers, MLP 4096, 8 heads, 1 KV head,
head dim 256) and replace the 3B PaliGemma prefix by a tiny one of the same depth and head layout plus random
keys/values of the real prefix length. That keeps CPU runs possible (no 3B model in memory).
"""

from __future__ import annotations

import torch

from fastnft.policies.pi0 import Pi0Model, PrefixContext
from fastnft.policies.pi0_config import Pi0Config, VLMConfig

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # openpi's three cameras


def pi0_config(variant: str = "pi0") -> Pi0Config:
    """Full-size pi0 / pi0.5 config with three cameras (P = 3 * 256 + prompt tokens)."""
    return (Pi0Config.pi0 if variant == "pi0" else Pi0Config.pi05)(cameras=CAMERAS)


def expert_model(variant: str = "pi0", dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> tuple[Pi0Model, Pi0Config]:
    """A :class:`Pi0Model` whose expert is pi0-size and whose prefix is a tiny stand-in of the same depth/heads.

    Returns the model (expert and projections in ``dtype``) and the FULL config (for the prefix length).
    """
    full = pi0_config(variant)
    v = full.vlm
    small = VLMConfig(image_size=14, patch_size=14, vision_width=8, vision_depth=1, vision_mlp_dim=8, vision_heads=1,
                      width=8, depth=v.depth, mlp_dim=8, num_heads=v.num_kv_heads, num_kv_heads=v.num_kv_heads,
                      head_dim=v.head_dim, vocab_size=8)
    cfg = Pi0Config(**{**full.to_dict(), "vlm": small, "expert": full.expert, "vlm_dtype": "bfloat16",
                       "attention": "auto"})
    with torch.device(device):
        model = Pi0Model(cfg)
    for name, mod in model.named_children():
        if name != "paligemma_with_expert":
            mod.to(dtype)
    model.expert.to(dtype)
    return model, full


def synthetic_context(full: Pi0Config, batch: int, dtype: torch.dtype = torch.bfloat16,
                      device: str | torch.device = "cpu", seed: int = 0) -> PrefixContext:
    """Random prefix keys/values of the full prefix length (every prefix token valid) and a random state."""
    g = torch.Generator(device=device).manual_seed(seed)
    v = full.vlm
    shape = (batch, v.num_kv_heads, full.prefix_len, v.head_dim)
    keys = tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(v.depth))
    values = tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(v.depth))
    valid = torch.ones(batch, full.prefix_len, dtype=torch.bool, device=device)
    state = torch.randn(batch, full.max_state_dim, generator=g, device=device, dtype=dtype)
    return PrefixContext(keys, values, valid, state if full.variant == "pi0" else None)
