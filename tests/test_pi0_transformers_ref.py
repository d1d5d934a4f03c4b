"""A reference no one here wrote: transformers' own ``PI0ForConditionalGeneration`` (``transformers.models.pi0``,
transformers 5.x) against fastnft's pi0, both directions through files (fp32, CPU, tiny random models).

transformers -> fastnft: transformers builds a random model and writes it with ``save_pretrained``; fastnft loads
the directory (layout detected from the keys and config.json) and must give the same velocity and the same K-step
Euler samples from the same noise. fastnft -> transformers: fastnft writes ``layout="transformers"``;
``PI0ForConditionalGeneration.from_pretrained`` must load every key (no missing, unexpected or mismatched key) and
give the same outputs. A negative control checks that the comparison would see a misplaced weight.

Where transformers' port and openpi disagree fastnft follows openpi (docs/pi0_checkpoints.md). The one that touches
these numbers is the sinusoidal time embedding: openpi computes it in float64, transformers in float32. The test
gives transformers openpi's float64 embedding when fastnft's is float64 too, so the comparison is of the rest.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_checkpoint import RUNTIME_FIELDS
from fastnft.policies.pi0_config import Pi0Config
from fastnft.sde import flow_sde_schedule, sample_actions

tf = pytest.importorskip("transformers")
if not hasattr(tf, "PI0ForConditionalGeneration"):
    pytest.skip(f"transformers {tf.__version__} has no PI0ForConditionalGeneration (5.x only)", allow_module_level=True)

TOL = 1e-5
# transformers' save_pretrained writes no normalisation statistics: load without normalisation, on purpose (the
# statistics refusal, where present, only allows that explicitly)
NO_STATS = {"normalization": "identity"} if "normalization" in RUNTIME_FIELDS else {}
B, CAMS, L = 3, ("base_0_rgb", "wrist_0_rgb"), 6


def _ref_config(cfg: Pi0Config):
    from fastnft.policies.pi0_hf_config import to_transformers_config

    d = to_transformers_config(cfg)
    d.pop("architectures"), d.pop("model_type")
    return tf.PI0Config(**d)


def _fastnft_time_is_float64(pol: Pi0Policy) -> bool:
    """Whether fastnft's pi0 computes the time embedding as openpi does (float64): the embedding the model itself
    uses is recorded during one suffix embedding and compared with openpi's (float32 is ~1e-5 off at t = 0.97)."""
    import fastnft.policies.pi0 as pi0_module

    seen = []
    orig = pi0_module.sinusoidal_time_embedding

    def spy(t, *args, **kwargs):
        out = orig(t, *args, **kwargs)
        seen.append((t, out))
        return out

    c = pol.cfg
    pi0_module.sinusoidal_time_embedding = spy
    try:
        with torch.no_grad():
            pol.model.embed_suffix(torch.zeros(1, c.max_state_dim), torch.zeros(1, c.chunk_size, c.max_action_dim),
                                   torch.tensor([0.97]))
    finally:
        pi0_module.sinusoidal_time_embedding = orig
    if not seen:
        raise AssertionError("fastnft.policies.pi0 no longer calls sinusoidal_time_embedding: update this probe")
    t, out = seen[0]
    ref = _openpi_time(t, out.shape[-1], c.min_period, c.max_period)
    return bool((out.double() - ref).abs().max() < 1e-7)


def _openpi_time(t, dim, min_period, max_period):
    """openpi's ``create_sinusoidal_pos_embedding``: float64 throughout."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    arg = (1.0 / period * 2 * math.pi)[None] * t.double()[:, None]
    return torch.cat([arg.sin(), arg.cos()], 1)


def _match_time_embedding(monkeypatch, pol: Pi0Policy) -> None:
    """transformers' PI0 computes the time embedding in float32, openpi in float64: give transformers openpi's when
    fastnft follows openpi here, so that the comparison measures everything else."""
    if _fastnft_time_is_float64(pol):
        from transformers.models.pi0 import modeling_pi0

        def forward(self, time):
            c = self.config
            return _openpi_time(time, c.dit_config.hidden_size, c.min_period, c.max_period).float()

        monkeypatch.setattr(modeling_pi0.PI0TimestepEmbeddings, "forward", forward)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights of order 1 / sqrt(fan_in), norms and biases away from their init: every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _inputs(cfg: Pi0Config):
    g = torch.Generator().manual_seed(1)
    S, V = cfg.vlm.image_size, cfg.vlm.vocab_size
    T = cfg.vlm.tokens_per_image
    images = torch.rand(B, len(CAMS), 3, S, S, generator=g) * 2 - 1
    lang = torch.randint(4, V - 1, (B, L), generator=g)
    lmask = torch.ones(B, L, dtype=torch.bool)
    lmask[1, 4:] = False  # right-padded prompts of different lengths
    lmask[2, 2:] = False
    state = torch.randn(B, cfg.max_state_dim, generator=g)
    ours = {"images": images, "image_masks": torch.ones(B, len(CAMS), dtype=torch.bool), "lang_tokens": lang,
            "lang_masks": lmask, "state": state}
    n_img = len(CAMS) * T
    theirs = {"state": state, "pixel_values": images, "pixel_attention_mask": ours["image_masks"],
              "input_ids": torch.cat([torch.full((B, n_img), V), lang], 1),  # image placeholders first, as fastnft
              "attention_mask": torch.cat([torch.ones(B, n_img, dtype=torch.long), lmask.long()], 1)}
    x = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, generator=g)
    t = torch.tensor([0.97, 0.5, 0.13])
    return ours, theirs, x, t


@torch.no_grad()
def _diffs(pol: Pi0Policy, ref, cfg: Pi0Config) -> dict[str, float]:
    ours, theirs, x, t = _inputs(cfg)
    ctx = pol.encode(ours)
    v_ref = ref(noise=x, timestep=t, **theirs).logits
    out = {"velocity": (pol.velocity(x, t, ctx) - v_ref).abs().max().item(), "|v|": v_ref.abs().max().item()}
    for K in (4, 10):
        a_ref = ref.sample_actions(noise=x, num_steps=K, **theirs)
        a = sample_actions(lambda xx, tt: pol.velocity(xx, tt, ctx), x, flow_sde_schedule(K, 0.0),
                           stochastic=False).actions
        out[f"sample K={K}"] = (a - a_ref).abs().max().item()
    return out


def test_transformers_save_pretrained_loads_into_fastnft_with_the_same_outputs(tmp_path, monkeypatch):
    cfg = Pi0Config.tiny("pi0", cameras=CAMS, chunk_size=5, n_action_steps=5, max_state_dim=6, max_action_dim=7,
                         state_dim=6, action_dim=7)
    torch.manual_seed(0)
    ref = tf.PI0ForConditionalGeneration(_ref_config(cfg)).eval()
    _randomise(ref, 2)
    ref.save_pretrained(tmp_path / "ref")
    pol = Pi0Policy.load(tmp_path / "ref", cameras=CAMS, vlm_dtype="float32", attention="sdpa", **NO_STATS).eval()
    _match_time_embedding(monkeypatch, pol)
    assert (pol.cfg.vlm, pol.cfg.expert, pol.cfg.chunk_size) == (cfg.vlm, cfg.expert, cfg.chunk_size)
    d = _diffs(pol, ref, cfg)
    print("transformers -> fastnft max abs diffs:", d)
    assert d["|v|"] > 0.5
    assert max(d["velocity"], d["sample K=4"], d["sample K=10"]) <= TOL, d
    # negative control: SigLIP's query and key projections swapped (a plausible key-map slip) is seen
    tower = pol.model.vlm.model.vision_tower
    attn = getattr(tower, "vision_model", tower).encoder.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj.weight.clone()
        attn.q_proj.weight.copy_(attn.k_proj.weight)
        attn.k_proj.weight.copy_(q)
    assert _diffs(pol, ref, cfg)["velocity"] > 100 * TOL


def test_fastnft_transformers_layout_loads_into_transformers_with_the_same_outputs(tmp_path, monkeypatch):
    cfg = Pi0Config.tiny("pi0", cameras=CAMS, chunk_size=5, n_action_steps=5, max_state_dim=6, max_action_dim=7,
                         state_dim=6, action_dim=7)
    torch.manual_seed(0)
    pol = Pi0Policy(cfg).eval()
    _randomise(pol.model, 3)
    pol.save(tmp_path / "ours", layout="transformers")
    _match_time_embedding(monkeypatch, pol)
    ref, info = tf.PI0ForConditionalGeneration.from_pretrained(tmp_path / "ours", output_loading_info=True)
    ref = ref.eval().float()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    d = _diffs(pol, ref, cfg)
    print("fastnft -> transformers max abs diffs:", d)
    assert d["|v|"] > 0.5
    assert max(d["velocity"], d["sample K=4"], d["sample K=10"]) <= TOL, d


def test_transformers_layout_refuses_pi05(tmp_path):
    with pytest.raises(ValueError, match="pi0 only"):
        Pi0Policy(Pi0Config.tiny("pi05")).save(tmp_path / "x", layout="transformers")
