"""pi0 / pi0.5 compute openpi's numbers: time embedding, prompt ids, state bins, image resize, bf16 islands, and a
model that no transformers version changes (the sqrt(width) scale of the prompt embeddings).

Each reference below is written from openpi's source (``src/openpi/models_pytorch/pi0_pytorch.py``,
``gemma_pytorch.py``, ``src/openpi/models/tokenizer.py``, ``src/openpi/shared/image_tools.py``), not from fastnft.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pi0_helpers import raw_obs

from fastnft.policies.image import siglip_pixels
from fastnft.policies.pi0 import FP32_UNDER_BF16, Pi0Policy, check_transformers_version
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, NormStats, Pi0Processor
from fastnft.policies.state_flow import sinusoidal_time_embedding
from fastnft.policies.tokenizer import ByteTokenizer, PromptTokenizer, discretize_state


def _policy(variant: str, **kw) -> Pi0Policy:
    torch.manual_seed(0)
    pol = Pi0Policy(Pi0Config.tiny(variant, **kw))
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    return pol.eval()


# -- time embedding ----------------------------------------------------------------------------------------------
def _openpi_time_embedding(t: torch.Tensor, dim: int, min_period=4e-3, max_period=4.0) -> torch.Tensor:
    """openpi's create_sinusoidal_pos_embedding on CPU (float64), then ``.type(timestep.dtype)``."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** fraction
    sin_input = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([torch.sin(sin_input), torch.cos(sin_input)], dim=1).type(t.dtype)


def test_time_embedding_is_computed_in_float64_as_openpi():
    t = torch.tensor([0.0, 0.123457, 0.5, 0.71234, 0.999], dtype=torch.float32)
    ref = _openpi_time_embedding(t, 1024)
    f64 = sinusoidal_time_embedding(t, 1024, compute_dtype=torch.float64)
    f32 = sinusoidal_time_embedding(t, 1024)
    assert f64.dtype == torch.float32 and (f64 - ref).abs().max() < 1e-7
    assert (f32 - ref).abs().max() > 1e-5  # float32 is measurably off: the test can tell the two apart
    # and the model uses the float64 one: pi0.5's adaRMS condition from the reference embedding, bit for bit
    pol = _policy("pi05")
    m, W = pol.model, pol.cfg.expert.width
    t = torch.tensor([0.71234, 0.333333, 0.9876], dtype=torch.float32)
    _, _, cond = m.embed_suffix(None, torch.zeros(3, pol.H, pol.D), t)
    want = F.silu(m.time_mlp_out(F.silu(m.time_mlp_in(_openpi_time_embedding(t, W)))))
    assert torch.equal(cond, want)


# -- prompt ------------------------------------------------------------------------------------------------------
CORPUS = ["Task: pick up the red cube, State: 0 12 128 255 -1 7;\nAction: ", "push the blue block to the left",
          "Task: open the drawer, State: 3 45 99 200 17 -1;\nAction: ", "stack the green cube on the red cube",
          "pick up the red cube and place it on the goal", "0 1 2 3 4 5 6 7 8 9 - ; : ,"]


def _paligemma_like_spm(folder) -> PromptTokenizer:
    """A SentencePiece model trained here with PaliGemma's settings that matter for the ids: no normalisation, no
    whitespace collapsing (so a trailing space and a newline are tokens), byte fallback, '\\n' a piece."""
    import sentencepiece as spm

    prefix = folder / "pg"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 30), model_prefix=str(prefix), vocab_size=300,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n"],
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    return PromptTokenizer(prefix.with_suffix(".model"), max_length=128)


def _openpi_ids(sp, task: str, state: np.ndarray | None) -> list[int]:
    """openpi's PaligemmaTokenizer.tokenize, unpadded."""
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    if state is None:
        return sp.encode(cleaned, add_bos=True) + sp.encode("\n")
    bins = np.digitize(state, bins=np.linspace(-1, 1, 256 + 1)[:-1]) - 1
    return sp.encode(f"Task: {cleaned}, State: {' '.join(map(str, bins))};\nAction: ", add_bos=True)


def test_pi05_prompt_ids_equal_openpi(tmp_path):
    tok = _paligemma_like_spm(tmp_path)
    state = np.array([-1.5, -1.0, -0.99, 0.0, 0.3, 0.992, 1.0, 2.5], dtype=np.float32)
    for task in ["pick_up the red cube", "  open the drawer\n"]:
        want = _openpi_ids(tok.sp, task, state)
        assert tok.encode_one(task, torch.from_numpy(state)) == want
        assert tok.sp.piece_to_id("\n") in want and tok.sp.id_to_piece(want[-1]) != "\n"  # '\n' mid-prompt
        assert tok.encode_one(task) == _openpi_ids(tok.sp, task, None)  # pi0's format too
    ids, mask = tok(["pick_up the red cube"], states=torch.from_numpy(state)[None])
    n = int(mask.sum())
    assert ids[0, :n].tolist() == _openpi_ids(tok.sp, "pick_up the red cube", state) and (ids[0, n:] == 0).all()


def test_pi05_processor_puts_openpi_ids_in_the_batch(tmp_path):
    tok = _paligemma_like_spm(tmp_path)
    cfg = Pi0Config.tiny("pi05", tokenizer_max_length=128)
    g = torch.Generator().manual_seed(3)
    st = NormStats.fit(torch.randn(100, cfg.state_dim, generator=g))
    ac = NormStats.fit(torch.randn(100, cfg.action_dim, generator=g))
    proc = Pi0Processor(cfg, tok, st, ac, "quantile")
    obs = raw_obs(cfg, B=2)
    obs[STATE_KEY][0, 0] = st.q01[0] - 5.0  # far below q01: normalised < -1, openpi's bin -1
    out = proc(obs)
    for b in range(2):
        s = st.normalize(obs[STATE_KEY][b], "quantile").numpy()
        want = _openpi_ids(tok.sp, obs["task"], s)
        assert out["lang_tokens"][b, : len(want)].tolist() == want and int(out["lang_masks"][b].sum()) == len(want)


def test_state_bins_follow_np_digitize_out_of_range_included():
    x = torch.tensor([-3.0, -1.0 - 1e-6, -1.0, -0.9921875, 0.0, 0.5, 0.9921875, 0.99999, 1.0, 7.0])
    want = (np.digitize(x.numpy(), np.linspace(-1, 1, 257)[:-1]) - 1).tolist()
    assert discretize_state(x) == want
    assert want[:2] == [-1, -1] and want[2] == 0 and want[-2:] == [255, 255]  # below -1 is -1, not bin 0
    with pytest.raises(ValueError, match="non-finite"):
        discretize_state(torch.tensor([0.0, float("nan")]))


def test_byte_tokenizer_pi05_keeps_the_prompt_bytes():
    tok = ByteTokenizer(max_length=128)
    ids = tok.encode_one("pick_cube", torch.tensor([-2.0, 0.0]))
    assert bytes(i - tok.OFFSET for i in ids[1:]).decode() == "Task: pick cube, State: -1 128;\nAction: "


# -- images ------------------------------------------------------------------------------------------------------
def _openpi_resize_with_pad_torch(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """openpi.shared.image_tools.resize_with_pad_torch for float32 [B, H, W, C] in [-1, 1]."""
    x = images.permute(0, 3, 1, 2)
    _, _, h, w = x.shape
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    ph0, rem_h = divmod(height - rh, 2)
    pw0, rem_w = divmod(width - rw, 2)
    x = F.pad(x, (pw0, pw0 + rem_w, ph0, ph0 + rem_h), mode="constant", value=-1.0)
    return x.permute(0, 2, 3, 1)


@pytest.mark.parametrize("hw", [(256, 256), (100, 256), (300, 180)])
def test_resize_equals_openpi_pytorch(hw):
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, *hw, 3), generator=g, dtype=torch.uint8)
    # openpi: uint8 -> float32 / 255 * 2 - 1 (Observation.from_dict), then the model's resize_with_pad_torch
    want = _openpi_resize_with_pad_torch(frames.float() / 255.0 * 2.0 - 1.0, 224, 224).permute(0, 3, 1, 2)
    got = siglip_pixels(frames, 224)
    assert got.shape == (2, 3, 224, 224)
    assert (got - want).abs().max() < 1e-6


# -- bf16 islands ------------------------------------------------------------------------------------------------
def test_bf16_prefix_keeps_openpis_fp32_parameters():
    pol = _policy("pi05", vlm_dtype="bfloat16")
    kept = {n for n, p in pol.model.vlm.named_parameters() if p.dtype == torch.float32}
    # openpi's selectors, matched on its names ("model.norm" is the final norm of the language model)
    sel = ("patch_embedding.weight", "patch_embedding.bias", "position_embedding.weight", "input_layernorm",
           "post_attention_layernorm", "language_model.norm")
    want = {n for n, _ in pol.model.vlm.named_parameters() if any(s in n for s in sel)}
    assert kept == want and len(want) == 3 + 2 * pol.cfg.vlm.depth + 1
    assert all(any(s in n for s in FP32_UNDER_BF16) for n in kept)
    others = [p.dtype for n, p in pol.model.vlm.named_parameters() if n not in kept]
    assert others and all(d == torch.bfloat16 for d in others)


def test_bf16_siglip_embeddings_are_summed_in_fp32():
    pol = _policy("pi0", vlm_dtype="bfloat16")
    vt = pol.model.vlm.model.vision_tower
    vt = getattr(vt, "vision_model", vt)
    seen = {}
    hook = vt.encoder.register_forward_pre_hook(lambda mod, args, kw: seen.update(x=kw["inputs_embeds"]),
                                                with_kwargs=True)
    try:
        S = pol.cfg.vlm.image_size
        pix = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
        pol.model.embed_images(pix)
    finally:
        hook.remove()
    e = vt.embeddings
    ref = F.conv2d(pix, e.patch_embedding.weight.float(), e.patch_embedding.bias.float(),
                   stride=pol.cfg.vlm.patch_size).flatten(2).transpose(1, 2) + e.position_embedding.weight.float()
    assert seen["x"].dtype == torch.bfloat16 and torch.equal(seen["x"], ref.to(torch.bfloat16))


# -- independent of the transformers version ---------------------------------------------------------------------
def test_prompt_embeddings_are_scaled_by_sqrt_width_whatever_embed_tokens_does():
    pol = _policy("pi0")
    cfg = pol.cfg
    emb_mod = pol.model.vlm.model.language_model.embed_tokens
    ids = torch.tensor([[5, 9, 17, 0]])
    N, S = len(cfg.cameras), cfg.vlm.image_size
    images, masks = torch.zeros(1, N, 3, S, S), torch.ones(1, N, dtype=torch.bool)
    want = emb_mod.weight[ids] * math.sqrt(cfg.vlm.width)
    emb, _ = pol.model.embed_prefix(images, masks, ids, torch.ones_like(ids, dtype=torch.bool))
    assert torch.allclose(emb[:, -4:], want, rtol=1e-6, atol=0)
    # transformers 4.x: embed_tokens is a plain nn.Embedding (the scale lives in GemmaModel.forward, never called
    # here). Simulate it: the prompt embeddings must not change.
    if hasattr(emb_mod, "embed_scale"):
        emb_mod.embed_scale.fill_(1.0)
        emb1, _ = pol.model.embed_prefix(images, masks, ids, torch.ones_like(ids, dtype=torch.bool))
        assert torch.equal(emb1, emb)


def test_unsupported_transformers_version_is_refused():
    check_transformers_version("5.24.0")
    for v in ("4.57.6", "4.51.3", "6.0.0"):
        with pytest.raises(ImportError, match=r"pip install 'transformers>=5,<6'"):
            check_transformers_version(v)
