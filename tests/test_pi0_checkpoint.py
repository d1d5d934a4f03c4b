"""pi0 checkpoints in the openpi PyTorch / lerobot layout: bit-exact round trip, clear refusals naming the key."""

from __future__ import annotations

import json

import pytest
import torch
from pi0_helpers import raw_obs, train_tiny_spm
from safetensors.torch import load_file, save_file

from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_checkpoint import CheckpointError, read_checkpoint
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import NormStats, Pi0Processor
from fastnft.policies.tokenizer import PromptTokenizer


def _policy(tmp_path, variant="pi0") -> Pi0Policy:
    torch.manual_seed(0)
    cfg = Pi0Config.tiny(variant)
    g = torch.Generator().manual_seed(3)
    proc = Pi0Processor(cfg, PromptTokenizer(train_tiny_spm(tmp_path), cfg.tokenizer_max_length),
                        NormStats.fit(torch.randn(50, cfg.state_dim, generator=g)),
                        NormStats.fit(torch.randn(50, cfg.action_dim, generator=g) * 3 + 1), "mean_std")
    pol = Pi0Policy(cfg, proc)
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    return pol.eval()


@pytest.mark.parametrize("variant,layout", [("pi0", "lerobot"), ("pi05", "openpi")])
def test_round_trip_is_bit_exact(tmp_path, variant, layout):
    pol = _policy(tmp_path, variant)
    d1 = pol.save(tmp_path / "ck1", layout=layout)
    names = {p.name for p in d1.iterdir()}
    assert {"model.safetensors", "config.json", "fastnft_config.json", "tokenizer.model"} <= names
    conf = json.loads((d1 / "config.json").read_text())  # every field lerobot reads: tests/test_pi0_stats.py
    assert conf["type"] == variant and conf["num_inference_steps"] == pol.cfg.num_steps
    assert conf["normalization_mapping"]["STATE"] == "MEAN_STD"
    keys = list(load_file(str(d1 / "model.safetensors")))
    assert all(k.startswith("model.") for k in keys) == (layout == "lerobot")
    assert "model.action_in_proj.weight" in keys or "action_in_proj.weight" in keys
    back = Pi0Policy.load(d1)
    assert back.cfg == pol.cfg
    sd0, sd1 = pol.model.state_dict(), back.model.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k
    d2 = back.save(tmp_path / "ck2", layout=layout)
    assert (d1 / "model.safetensors").read_bytes() == (d2 / "model.safetensors").read_bytes()
    # the processor (statistics, tokenizer) came back too: same actions from the same raw observation
    obs = raw_obs(pol.cfg)
    x = torch.randn(2, pol.H, pol.D)
    assert torch.equal(pol.to_env_actions(x), back.to_env_actions(x))
    assert torch.equal(pol.process(obs)["lang_tokens"], back.process(obs)["lang_tokens"])
    ctx0, ctx1 = pol.encode(obs), back.encode(obs)
    t = torch.full((2,), 0.5)
    assert torch.equal(pol.velocity(x, t, ctx0), back.velocity(x, t, ctx1))


def _saved(tmp_path):
    pol = _policy(tmp_path)
    d = pol.save(tmp_path / "ck")
    return d, load_file(str(d / "model.safetensors"))


def test_missing_key_is_named(tmp_path):
    d, sd = _saved(tmp_path)
    key = "model.paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    del sd[key]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): paligemma_with_expert\.gemma_expert\.model"
                                              r"\.layers\.1\.mlp\.up_proj\.weight"):
        Pi0Policy.load(d)


def test_unexpected_key_and_shape_mismatch_are_named(tmp_path):
    d, sd = _saved(tmp_path)
    sd["model.extra_head.weight"] = torch.zeros(3)
    sd["model.action_out_proj.weight"] = torch.zeros(5, 16)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        Pi0Policy.load(d)
    msg = str(e.value)
    assert "unexpected keys (1): extra_head.weight" in msg
    assert "action_out_proj.weight: checkpoint (5, 16) vs model (8, 16)" in msg


def test_corrupted_files_are_refused(tmp_path):
    d, sd = _saved(tmp_path)
    key = "model.paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.k_proj.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"language_model\.layers\.0\.self_attn\.k_proj\.weight holds NaN"):
        Pi0Policy.load(d)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is unreadable or truncated"):
        Pi0Policy.load(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        Pi0Policy.load(d)


def test_config_mismatch_is_refused_with_keys(tmp_path):
    d, _ = _saved(tmp_path)
    conf = json.loads((d / "fastnft_config.json").read_text())
    conf["max_action_dim"] = 10  # the weights were made for 8
    (d / "fastnft_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match=r"action_in_proj\.weight: checkpoint \(16, 8\) vs model \(16, 10\)"):
        Pi0Policy.load(d)
    with pytest.raises(CheckpointError, match="architecture fields"):
        read_checkpoint(d, chunk_size=3)


def test_ignored_keys_of_other_ports_are_accepted(tmp_path):
    d, sd = _saved(tmp_path)
    sd["model.paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(128, 16)
    sd["model.paligemma_with_expert.paligemma.lm_head.weight"] = torch.zeros(128, 24)  # tied to embed_tokens
    save_file(sd, str(d / "model.safetensors"))
    back = Pi0Policy.load(d)
    emb = back.model.vlm.model.language_model.embed_tokens.weight
    assert emb.abs().sum() > 0 and back.model.vlm.lm_head.weight is emb  # the tie holds, zeros were not loaded


def test_lerobot_config_without_fastnft_config_maps_to_pi0_sizes(tmp_path):
    conf = {"type": "pi05", "chunk_size": 50, "n_action_steps": 10, "max_state_dim": 32, "max_action_dim": 32,
            "tokenizer_max_length": 200, "num_inference_steps": 10, "paligemma_variant": "gemma_2b",
            "action_expert_variant": "gemma_300m",
            "input_features": {"observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                               "observation.images.left_wrist_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]},
                               "observation.state": {"type": "STATE", "shape": [9]}},
            "output_features": {"action": {"type": "ACTION", "shape": [8]}}}
    (tmp_path / "config.json").write_text(json.dumps(conf))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    ck = read_checkpoint(tmp_path, normalization="identity")  # no statistics here: tests/test_pi0_stats.py
    assert ck.cfg == Pi0Config.pi05(n_action_steps=10, cameras=("base_0_rgb", "left_wrist_0_rgb"), state_dim=9,
                                    action_dim=8, normalization="identity")
    conf["paligemma_variant"] = "gemma_7b"
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="paligemma_variant='gemma_7b'"):
        read_checkpoint(tmp_path)


def test_legacy_transformers_key_names_are_renamed(tmp_path):
    pol = _policy(tmp_path)
    d = pol.save(tmp_path / "ck", layout="openpi")
    sd = load_file(str(d / "model.safetensors"))
    pg = "paligemma_with_expert.paligemma."
    old = {}
    for k, v in sd.items():  # the names transformers < 4.52 wrote
        for new, legacy in ((pg + "model.language_model.", pg + "language_model.model."),
                            (pg + "model.vision_tower.", pg + "vision_tower."),
                            (pg + "model.multi_modal_projector.", pg + "multi_modal_projector.")):
            if k.startswith(new):
                k = legacy + k[len(new):]
        old[k] = v
    assert old.keys() != sd.keys()
    save_file(old, str(d / "model.safetensors"))
    back = Pi0Policy.load(d)
    for k, v in pol.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
