"""pi0 observation processing: SigLIP image preprocessing, the prompt tokenizer, normalisation as a processor step."""

from __future__ import annotations

import pytest
import torch
from pi0_helpers import raw_obs, train_tiny_spm

from fastnft.policies.image import resize_with_pad, siglip_pixels, to_channels_first
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, NormStats, Pi0Processor, image_key
from fastnft.policies.tokenizer import PromptTokenizer, TokenizerError, pi05_prompt
from fastnft.sde import flow_sde_schedule


# -- images ----------------------------------------------------------------------------------------------------
def test_siglip_pixels_layouts_dtypes_and_range():
    g = torch.Generator().manual_seed(0)
    hwc = torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8)
    a = siglip_pixels(hwc, 16)
    b = siglip_pixels(hwc.permute(0, 3, 1, 2), 16)
    c = siglip_pixels(hwc.float() / 255, 16)
    assert a.shape == (2, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-6)
    assert torch.allclose(a, hwc.permute(0, 3, 1, 2).float() / 127.5 - 1, atol=1e-6)  # (x/255 - 0.5) / 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        siglip_pixels(hwc.float(), 16)  # 0..255 floats are a units mistake
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        to_channels_first(torch.zeros(1, 8, 8, 4))


def test_resize_with_pad_keeps_aspect_and_pads_black():
    img = torch.ones(1, 3, 8, 16)  # wide white frame
    out = siglip_pixels(img, 16)
    # 8x16 -> 8x16 inside 16x16: 4 black rows above and below, white (1.0) in the middle
    assert torch.all(out[..., :4, :] == -1) and torch.all(out[..., 12:, :] == -1)
    assert torch.allclose(out[..., 4:12, :], torch.ones(1, 3, 8, 16))
    ramp = torch.linspace(0, 1, 32).expand(1, 3, 32, 32).contiguous()
    small = resize_with_pad(ramp, 16)
    assert small.shape == (1, 3, 16, 16) and (small[0, 0, 0, 1:] >= small[0, 0, 0, :-1]).all()


# -- tokenizer -------------------------------------------------------------------------------------------------
def test_prompt_tokenizer_format_padding_truncation(tmp_path):
    tok = PromptTokenizer(train_tiny_spm(tmp_path), max_length=32)
    ids, mask = tok(["pick_up the red cube", "open the drawer"])
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == torch.long
    n = mask.sum(1)
    assert ids[0, 0] == tok.sp.bos_id() and ids[1, 0] == tok.sp.bos_id()
    assert (ids[~mask] == 0).all() and mask[0, : n[0]].all()
    assert tok.sp.decode(ids[0, 1: n[0]].tolist()).strip() == "pick up the red cube"  # '_' read as a space
    assert ids[0, n[0] - 1] == tok.sp.piece_to_id("\n") != tok.sp.unk_id()  # the prompt ends with '\n'
    assert tok.sp.decode(ids[1, 1: n[1]].tolist()).strip() == "open the drawer"
    short = PromptTokenizer(tok.model_file, max_length=4)
    ids4, mask4 = short(["pick up the red cube"])
    assert mask4.all() and torch.equal(ids4[0], ids[0, :4])
    with pytest.raises(TokenizerError, match="tokenizer_max_length=4"):
        PromptTokenizer(tok.model_file, max_length=4, truncate=False)(["pick up the red cube"])
    with pytest.raises(TokenizerError, match="does not exist"):
        PromptTokenizer(tmp_path / "nope.model", 8)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        PromptTokenizer(tmp_path / "bad.model", 8)


def test_pi05_prompt_discretises_the_state():
    p = pi05_prompt("pick_cube", torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    assert p == "Task: pick cube, State: 0 128 255 255;\nAction: "


# -- processor -------------------------------------------------------------------------------------------------
def _processor(tmp_path, variant="pi0", mode="mean_std"):
    cfg = Pi0Config.tiny(variant, tokenizer_max_length=96 if variant == "pi05" else 7)
    g = torch.Generator().manual_seed(1)
    st = NormStats.fit(torch.randn(100, cfg.state_dim, generator=g) * 2 + 3)
    ac = NormStats.fit(torch.rand(100, cfg.action_dim, generator=g) * 4 - 1)
    return Pi0Processor(cfg, PromptTokenizer(train_tiny_spm(tmp_path), cfg.tokenizer_max_length), st, ac, mode)


@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
def test_processor_normalises_pads_and_inverts_actions(tmp_path, mode):
    proc = _processor(tmp_path, mode=mode)
    cfg = proc.cfg
    obs = raw_obs(cfg, B=3)
    out = proc(obs)
    assert out["state"].shape == (3, cfg.max_state_dim) and (out["state"][:, cfg.state_dim:] == 0).all()
    assert torch.allclose(out["state"][:, : cfg.state_dim], proc.state_stats.normalize(obs[STATE_KEY], mode))
    assert out["images"].shape == (3, len(cfg.cameras), 3, cfg.vlm.image_size, cfg.vlm.image_size)
    assert out["image_masks"].all() and out["lang_tokens"].shape == (3, cfg.tokenizer_max_length)
    a = torch.rand(5, cfg.action_dim) * 4 - 1
    assert torch.allclose(proc.unnormalize_actions(proc.normalize_actions(a)), a, atol=1e-5)
    if mode == "quantile":
        z = proc.normalize_actions(torch.stack([proc.action_stats.q01, proc.action_stats.q99]))
        assert torch.allclose(z, torch.tensor([[-1.0], [1.0]]).expand_as(z), atol=1e-4)


def test_processor_missing_camera_and_errors(tmp_path):
    proc = _processor(tmp_path)
    obs = raw_obs(proc.cfg)
    del obs[image_key(proc.cfg.cameras[1])]
    out = proc(obs)
    assert out["image_masks"][:, 0].all() and not out["image_masks"][:, 1].any()
    assert (out["images"][:, 1] == -1).all()
    with pytest.raises(KeyError, match="observation.state"):
        proc({k: v for k, v in obs.items() if k != STATE_KEY})
    with pytest.raises(ValueError, match="no camera image"):
        proc({STATE_KEY: obs[STATE_KEY], "task": "x"})
    with pytest.raises(ValueError, match="needs state statistic 'mean'"):
        Pi0Processor(proc.cfg, None, NormStats(), proc.action_stats, "mean_std")


def test_pi05_prompt_carries_the_state(tmp_path):
    proc = _processor(tmp_path, "pi05")
    obs = raw_obs(proc.cfg)
    a = proc(obs)["lang_tokens"]
    obs[STATE_KEY] = obs[STATE_KEY] + 5.0  # other state -> other state bins in the prompt
    assert not torch.equal(a, proc(obs)["lang_tokens"])


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_raw_observation_to_env_actions(tmp_path, variant):
    proc = _processor(tmp_path, variant)
    torch.manual_seed(0)
    pol = Pi0Policy(proc.cfg, proc).eval()
    rec = pol.sample(raw_obs(proc.cfg, B=2), flow_sde_schedule(4, 0.2), stochastic=False,
                     generator=torch.Generator().manual_seed(0))
    act = pol.to_env_actions(rec.actions[:, : pol.n_action_steps])
    assert act.shape == (2, pol.n_action_steps, proc.cfg.action_dim) and torch.isfinite(act).all()
    rec2 = pol.sample(raw_obs(proc.cfg, B=2), flow_sde_schedule(4, 0.2), stochastic=False,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(rec.actions, rec2.actions)  # same noise -> same ODE sample


def test_byte_tokenizer_format_and_checkpoint_round_trip(tmp_path):
    from fastnft.policies.tokenizer import ByteTokenizer

    tok = ByteTokenizer(max_length=6)
    ids, mask = tok(["ab", "pick_up the cube"])
    assert ids[0, :4].tolist() == [1, 3 + ord("a"), 3 + ord("b"), 3 + ord("\n")] and mask[0].sum() == 4
    assert mask[1].all() and ids[1, 3].item() == 3 + ord("c")  # "_" reads as a space; truncated at L
    assert int(ids.max()) < tok.vocab_size == 259
    with pytest.raises(TokenizerError, match="tokenizer_max_length"):
        ByteTokenizer(max_length=3, truncate=False)(["abcdef"])

    from dataclasses import replace

    cfg = Pi0Config.tiny(vlm=replace(Pi0Config.tiny().vlm, vocab_size=260))
    pol = Pi0Policy(cfg, Pi0Processor(cfg, ByteTokenizer(cfg.tokenizer_max_length), norm_mode="identity"))
    pol.save(tmp_path / "ck")
    back = Pi0Policy.load(tmp_path / "ck")
    assert isinstance(back.processor.tokenizer, ByteTokenizer)
    obs = raw_obs(cfg, B=2)
    a, b = pol.process(obs), back.process(obs)
    assert torch.equal(a["lang_tokens"], b["lang_tokens"]) and torch.equal(a["lang_masks"], b["lang_masks"])
