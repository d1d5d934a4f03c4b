"""pi0 / pi0.5 normalisation statistics: lerobot 0.4.x's and openpi's files in, lerobot's files out, no silent identity.

lerobot cannot be installed here (it caps torch below the installed one), so the files are checked against the format
read from lerobot 0.4.0 - 0.4.4's source (``configs/policies.py``, ``policies/pi0{,5}/configuration_pi0{,5}.py``,
``processor/pipeline.py``, ``processor/normalize_processor.py``) and openpi's (``shared/normalize.py``,
``transforms.py``). The formulas below are written from those sources, independently of fastnft's code.
"""

from __future__ import annotations

import json

import pytest
import torch
from pi0_helpers import raw_obs, train_tiny_spm
from safetensors.torch import load_file, save_file

from fastnft.config import ConfigError
from fastnft.policies.lerobot_files import read_lerobot03_buffers
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_checkpoint import CheckpointError
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, NormStats, Pi0Processor
from fastnft.policies.tokenizer import PromptTokenizer

# every field lerobot 0.4.0 .. 0.4.4 PI0Config / PI05Config (with PreTrainedConfig) has; draccus rejects others
LEROBOT_04_FIELDS = {
    "type", "n_obs_steps", "input_features", "output_features", "device", "use_amp", "push_to_hub", "repo_id",
    "private", "tags", "license", "pretrained_path", "paligemma_variant", "action_expert_variant", "dtype",
    "chunk_size", "n_action_steps", "max_state_dim", "max_action_dim", "num_inference_steps",
    "time_sampling_beta_alpha", "time_sampling_beta_beta", "time_sampling_scale", "time_sampling_offset",
    "min_period", "max_period", "image_resolution", "empty_cameras", "normalization_mapping",
    "gradient_checkpointing", "compile_model", "compile_mode", "optimizer_lr", "optimizer_betas", "optimizer_eps",
    "optimizer_weight_decay", "optimizer_grad_clip_norm", "scheduler_warmup_steps", "scheduler_decay_steps",
    "scheduler_decay_lr", "tokenizer_max_length"}
# the steps of make_pi0_pre_post_processors / make_pi05_pre_post_processors, in order
PRE_STEPS = {"pi0": ["rename_observations_processor", "to_batch_processor", "pi0_new_line_processor",
                     "tokenizer_processor", "device_processor", "normalizer_processor"],
             "pi05": ["rename_observations_processor", "to_batch_processor", "normalizer_processor",
                      "pi05_prepare_state_tokenizer_processor_step", "tokenizer_processor", "device_processor"]}
POST_STEPS = ["unnormalizer_processor", "device_processor"]


def _stats(cfg: Pi0Config, seed: int = 3) -> tuple[NormStats, NormStats]:
    g = torch.Generator().manual_seed(seed)
    return (NormStats.fit(torch.randn(60, cfg.state_dim, generator=g) * 2 + 0.5),
            NormStats.fit(torch.randn(60, cfg.action_dim, generator=g) * 3 + 1))


def _policy(tmp_path, variant="pi0", mode="mean_std", convention="openpi", tokenizer=True) -> Pi0Policy:
    torch.manual_seed(0)
    cfg = Pi0Config.tiny(variant)
    tok = PromptTokenizer(train_tiny_spm(tmp_path), cfg.tokenizer_max_length) if tokenizer else None
    st, ac = _stats(cfg)
    return Pi0Policy(cfg, Pi0Processor(cfg, tok, st, ac, mode, convention)).eval()


def _lerobot_stats(d, fname: str, registry: str) -> tuple[dict, dict]:
    """What lerobot's PolicyProcessorPipeline.from_pretrained + _NormalizationMixin.load_state_dict build."""
    pipe = json.loads((d / fname).read_text())
    step = next(s for s in pipe["steps"] if s["registry_name"] == registry)
    stats: dict = {}
    for flat_key, t in load_file(str(d / step["state_file"])).items():
        key, stat = flat_key.rsplit(".", 1)
        stats.setdefault(key, {})[stat] = t.float()
    return step["config"], stats


def _lerobot_apply(x, st, mode, eps, inverse=False):
    """lerobot 0.4.4 normalize_processor._apply_transform."""
    if mode == "MEAN_STD":
        return x * st["std"] + st["mean"] if inverse else (x - st["mean"]) / (st["std"] + eps)
    denom = st["q99"] - st["q01"]
    denom = torch.where(denom == 0, torch.tensor(eps), denom)
    return (x + 1.0) * denom / 2.0 + st["q01"] if inverse else 2.0 * (x - st["q01"]) / denom - 1.0


def _openpi_apply(x, st, quantile, inverse=False):
    """openpi transforms.Normalize / Unnormalize (statistics sliced to x's width)."""
    n = x.shape[-1]
    if not quantile:
        m, s = st["mean"][:n], st["std"][:n]
        return x * (s + 1e-6) + m if inverse else (x - m) / (s + 1e-6)
    lo, hi = st["q01"][:n], st["q99"][:n]
    return (x + 1.0) / 2.0 * (hi - lo + 1e-6) + lo if inverse else (x - lo) / (hi - lo + 1e-6) * 2.0 - 1.0


# -- saving: what lerobot 0.4.x reads ----------------------------------------------------------------------------
@pytest.mark.parametrize("variant,mode", [("pi0", "mean_std"), ("pi05", "quantile")])
def test_lerobot_save_holds_every_config_field_and_the_processor_files(tmp_path, variant, mode):
    pol = _policy(tmp_path, variant, mode, convention="lerobot")
    d = pol.save(tmp_path / "ck")
    cfg = pol.cfg
    conf = json.loads((d / "config.json").read_text())
    assert set(conf) == LEROBOT_04_FIELDS and conf["type"] == variant
    S = cfg.vlm.image_size
    lr = {"QUANTILES": "quantile", "MEAN_STD": "mean_std"}
    assert conf["image_resolution"] == [S, S] and conf["num_inference_steps"] == cfg.num_steps
    assert (conf["min_period"], conf["max_period"]) == (cfg.min_period, cfg.max_period)
    assert (conf["chunk_size"], conf["n_action_steps"]) == (cfg.chunk_size, cfg.n_action_steps)
    assert (conf["max_state_dim"], conf["max_action_dim"]) == (cfg.max_state_dim, cfg.max_action_dim)
    assert conf["tokenizer_max_length"] == cfg.tokenizer_max_length and conf["empty_cameras"] == 0
    assert lr[conf["normalization_mapping"]["STATE"]] == mode == lr[conf["normalization_mapping"]["ACTION"]]
    assert conf["normalization_mapping"]["VISUAL"] == "IDENTITY"
    assert conf["input_features"][STATE_KEY] == {"type": "STATE", "shape": [cfg.state_dim]}
    assert conf["input_features"][f"observation.images.{cfg.cameras[1]}"] == {"type": "VISUAL", "shape": [3, S, S]}
    assert conf["output_features"] == {"action": {"type": "ACTION", "shape": [cfg.action_dim]}}

    pre = json.loads((d / "policy_preprocessor.json").read_text())
    post = json.loads((d / "policy_postprocessor.json").read_text())
    assert pre["name"] == "policy_preprocessor" and post["name"] == "policy_postprocessor"
    assert [s["registry_name"] for s in pre["steps"]] == PRE_STEPS[variant]
    assert [s["registry_name"] for s in post["steps"]] == POST_STEPS
    i = PRE_STEPS[variant].index("normalizer_processor")
    assert pre["steps"][i]["state_file"] == f"policy_preprocessor_step_{i}_normalizer_processor.safetensors"
    assert post["steps"][0]["state_file"] == "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    tok = next(s for s in pre["steps"] if s["registry_name"] == "tokenizer_processor")["config"]
    assert tok["max_length"] == cfg.tokenizer_max_length and tok["padding"] == "max_length"

    # lerobot's normaliser, built from these files, gives fastnft's numbers
    nconf, stats = _lerobot_stats(d, "policy_preprocessor.json", "normalizer_processor")
    want = {f"{STATE_KEY}.{k}" for k in ("mean", "std", "q01", "q99")} | {f"action.{k}" for k in
                                                                             ("mean", "std", "q01", "q99")}
    assert set(load_file(str(d / pre["steps"][i]["state_file"]))) == want
    assert nconf["features"][STATE_KEY] == {"type": "STATE", "shape": [cfg.state_dim]}
    assert set(nconf["norm_map"]) == {"VISUAL", "STATE", "ACTION"} and nconf["eps"] == pol.processor.norm_eps
    obs = raw_obs(cfg, B=3)
    ours = pol.process(obs)["state"][:, : cfg.state_dim]
    theirs = _lerobot_apply(obs[STATE_KEY], stats[STATE_KEY], nconf["norm_map"]["STATE"], nconf["eps"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    pconf, pstats = _lerobot_stats(d, "policy_postprocessor.json", "unnormalizer_processor")
    assert set(pconf["features"]) == {"action"}
    x = torch.randn(2, pol.H, pol.D)
    theirs = _lerobot_apply(x[..., : cfg.action_dim], pstats["action"], pconf["norm_map"]["ACTION"], pconf["eps"],
                            inverse=True)
    torch.testing.assert_close(pol.to_env_actions(x), theirs, rtol=0, atol=1e-6)


def test_openpi_formulas_saved_for_lerobot_stay_within_its_epsilon(tmp_path):
    pol = _policy(tmp_path, "pi0", "mean_std", convention="openpi")
    d = pol.save(tmp_path / "ck")
    nconf, stats = _lerobot_stats(d, "policy_preprocessor.json", "normalizer_processor")
    assert nconf["eps"] == 1e-6  # openpi's, so lerobot's (x - mean) / (std + eps) is exactly openpi's normalise
    obs = raw_obs(pol.cfg, B=2)
    torch.testing.assert_close(pol.process(obs)["state"][:, : pol.cfg.state_dim],
                               _lerobot_apply(obs[STATE_KEY], stats[STATE_KEY], "MEAN_STD", 1e-6), rtol=0, atol=1e-6)
    x = torch.randn(2, pol.H, pol.D)
    _, pstats = _lerobot_stats(d, "policy_postprocessor.json", "unnormalizer_processor")
    diff = pol.to_env_actions(x) - _lerobot_apply(x[..., : pol.act_dim], pstats["action"], "MEAN_STD", 1e-6, True)
    assert 0 < float(diff.abs().max()) < 1e-5  # lerobot unnormalises with std, openpi with std + 1e-6


# -- loading: lerobot and openpi statistics ----------------------------------------------------------------------
def _bare_checkpoint(tmp_path, variant):
    """A checkpoint whose statistics the test writes itself: weights + configs, no statistics."""
    pol = _policy(tmp_path, variant, tokenizer=False)
    pol.processor = None
    d = pol.save(tmp_path / "ck")
    for p in d.glob("policy_*"):
        p.unlink()
    return pol.cfg, d


def _write_lerobot_processor(d, cfg, norm: str, stats: dict[str, torch.Tensor], eps=1e-8):
    """lerobot 0.4.x PolicyProcessorPipeline._save_pretrained output, written by hand."""
    feats = {STATE_KEY: {"type": "STATE", "shape": [cfg.state_dim]}, "action": {"type": "ACTION",
                                                                               "shape": [cfg.action_dim]}}
    nmap = {"VISUAL": "IDENTITY", "STATE": norm, "ACTION": norm}
    save_file(stats, str(d / "policy_preprocessor_step_2_normalizer_processor.safetensors"))
    save_file(stats, str(d / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    (d / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {"eps": eps, "features": feats, "norm_map": nmap},
         "state_file": "policy_preprocessor_step_2_normalizer_processor.safetensors"}]}))
    (d / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor",
         "config": {"eps": eps, "features": {"action": feats["action"]}, "norm_map": nmap},
         "state_file": "policy_postprocessor_step_0_unnormalizer_processor.safetensors"},
        {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]}))
    conf = json.loads((d / "config.json").read_text())
    conf["normalization_mapping"] = nmap
    (d / "config.json").write_text(json.dumps(conf))
    (d / "fastnft_processor.json").unlink(missing_ok=True)


@pytest.mark.parametrize("variant,norm", [("pi0", "MEAN_STD"), ("pi05", "QUANTILES")])
def test_lerobot_statistics_give_lerobots_numbers(tmp_path, variant, norm):
    cfg, d = _bare_checkpoint(tmp_path, variant)
    g = torch.Generator().manual_seed(7)
    stats = {f"{f}.{k}": torch.randn(n, generator=g) * (2.0 if k == "std" else 1.0) + (3.0 if k == "q99" else 0.0)
             for f, n in ((STATE_KEY, cfg.state_dim), ("action", cfg.action_dim))
             for k in ("mean", "std", "q01", "q99", "min", "max")}
    stats = {k: (v.abs() + 0.1 if k.endswith(".std") else v) for k, v in stats.items()}
    stats[f"{STATE_KEY}.q99"][0] = stats[f"{STATE_KEY}.q01"][0]  # a constant feature: lerobot puts eps there
    _write_lerobot_processor(d, cfg, norm, stats)
    pol = Pi0Policy.load(d)
    proc = pol.processor
    assert proc.norm_mode == {"MEAN_STD": "mean_std", "QUANTILES": "quantile"}[norm]
    assert proc.norm_convention == "lerobot" and proc.tokenizer is None
    st = {k.rsplit(".", 1)[1]: v for k, v in stats.items() if k.startswith(STATE_KEY)}
    ac = {k.rsplit(".", 1)[1]: v for k, v in stats.items() if k.startswith("action.")}
    s = torch.randn(4, cfg.state_dim, generator=g) * 3
    torch.testing.assert_close(proc.state({STATE_KEY: s}, "cpu")[:, : cfg.state_dim],
                               _lerobot_apply(s, st, norm, 1e-8), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, pol.H, pol.D, generator=g)
    torch.testing.assert_close(pol.to_env_actions(x), _lerobot_apply(x[..., : cfg.action_dim], ac, norm, 1e-8, True),
                               rtol=0, atol=1e-6)
    a = torch.randn(5, cfg.action_dim, generator=g)
    torch.testing.assert_close(proc.normalize_actions(a), _lerobot_apply(a, ac, norm, 1e-8), rtol=1e-6, atol=1e-6)


def _write_openpi_assets(d, asset_id: str, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    blob = {}
    for key in ("state", "actions"):
        q01 = torch.randn(width, generator=g) - 2
        blob[key] = {"mean": torch.randn(width, generator=g).tolist(),
                     "std": (torch.rand(width, generator=g) + 0.2).tolist(),
                     "q01": q01.tolist(), "q99": (q01 + torch.rand(width, generator=g) * 4 + 0.5).tolist()}
    p = d / "assets" / asset_id / "norm_stats.json"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"norm_stats": blob}, indent=2))
    return {k: {s: torch.tensor(v) for s, v in st.items()} for k, st in blob.items()}


def _as_openpi_checkpoint(d):
    """openpi's converter: config.json with no variant and no normalisation fields; no fastnft files."""
    (d / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": 6, "paligemma_variant": "gemma_2b",
                                               "action_expert_variant": "gemma_300m", "precision": "float32"}))
    (d / "fastnft_processor.json").unlink(missing_ok=True)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_openpi_norm_stats_give_openpis_numbers_and_several_assets_need_a_choice(tmp_path, variant):
    cfg, d = _bare_checkpoint(tmp_path, variant)
    _as_openpi_checkpoint(d)
    ref = _write_openpi_assets(d, "physical-intelligence/libero", 32, seed=1)  # padded to 32: openpi slices
    pol = Pi0Policy.load(d)
    proc = pol.processor
    quantile = variant == "pi05"  # openpi: use_quantile_norm = model_type != PI0
    assert proc.norm_mode == ("quantile" if quantile else "mean_std") and proc.norm_convention == "openpi"
    s = torch.randn(4, cfg.state_dim) * 3  # outside [q01, q99] too: neither port clips
    ours = proc.state({STATE_KEY: s}, "cpu")[:, : cfg.state_dim]
    torch.testing.assert_close(ours, _openpi_apply(s, ref["state"], quantile), rtol=1e-6, atol=1e-6)
    if quantile:
        assert float(ours.abs().max()) > 1.0
    x = torch.randn(2, pol.H, pol.D)
    torch.testing.assert_close(pol.to_env_actions(x), _openpi_apply(x[..., : cfg.action_dim], ref["actions"],
                                                                    quantile, inverse=True), rtol=1e-6, atol=1e-6)

    _write_openpi_assets(d, "trossen", cfg.state_dim, seed=2)
    with pytest.raises(CheckpointError, match=r"several .*'physical-intelligence/libero', 'trossen'.*asset_id"):
        Pi0Policy.load(d)
    ref2 = json.loads((d / "assets" / "trossen" / "norm_stats.json").read_text())["norm_stats"]
    chosen = Pi0Policy.load(d, asset_id="trossen").processor
    key = "q01" if quantile else "mean"
    assert torch.equal(getattr(chosen.state_stats, key), torch.tensor(ref2["state"][key]))
    with pytest.raises(CheckpointError, match=r"asset_id='droid'.*does not exist.*trossen"):
        Pi0Policy.load(d, asset_id="droid")
    # a forced mode reads the other statistic from the same file
    forced = Pi0Policy.load(d, asset_id="trossen", normalization="mean_std" if quantile else "quantile").processor
    assert forced.norm_mode == ("mean_std" if quantile else "quantile")


# -- refusal and the explicit switch -----------------------------------------------------------------------------
def test_checkpoint_without_statistics_is_refused_unless_identity_is_explicit(tmp_path):
    cfg, d = _bare_checkpoint(tmp_path, "pi05")
    _as_openpi_checkpoint(d)
    (d / "tokenizer.model").write_bytes(train_tiny_spm(tmp_path).read_bytes())  # the case that used to go identity
    with pytest.raises(CheckpointError) as e:
        Pi0Policy.load(d)
    msg = str(e.value)
    for part in ("no normalisation statistics", "quantile", "policy_preprocessor.json", "policy_postprocessor.json",
                 "assets/<asset_id>/norm_stats.json", "policy.pi0.normalization: identity"):
        assert part in msg, part
    pol = Pi0Policy.load(d, normalization="identity")
    assert pol.processor.norm_mode == "identity" and pol.processor.tokenizer is not None
    s = torch.randn(2, cfg.state_dim)
    assert torch.equal(pol.processor.state({STATE_KEY: s}, "cpu")[:, : cfg.state_dim], s)
    x = torch.randn(2, pol.H, pol.D)
    assert torch.equal(pol.to_env_actions(x), x[..., : cfg.action_dim])


def test_lerobot_files_that_name_a_mode_but_hold_no_statistics_are_refused(tmp_path):
    cfg, d = _bare_checkpoint(tmp_path, "pi05")
    _write_lerobot_processor(d, cfg, "QUANTILES", {f"{STATE_KEY}.mean": torch.zeros(cfg.state_dim),
                                                   f"{STATE_KEY}.std": torch.ones(cfg.state_dim),
                                                   "action.mean": torch.zeros(cfg.action_dim),
                                                   "action.std": torch.ones(cfg.action_dim)})
    with pytest.raises(CheckpointError, match=r"no observation.state statistic 'q01'.*quantile"):
        Pi0Policy.load(d)
    assert Pi0Policy.load(d, normalization="mean_std").processor.norm_mode == "mean_std"
    # lerobot's own pipeline without a state file passes values through unchanged: fastnft refuses instead
    pre = json.loads((d / "policy_preprocessor.json").read_text())
    for fname in ("policy_preprocessor.json", "policy_postprocessor.json"):
        pipe = json.loads((d / fname).read_text())
        for step in pipe["steps"]:
            step.pop("state_file", None)
        (d / fname).write_text(json.dumps(pipe))
    assert pre != json.loads((d / "policy_preprocessor.json").read_text())
    with pytest.raises(CheckpointError, match="no observation.state statistic 'q01'"):
        Pi0Policy.load(d)


def test_identity_saved_explicitly_round_trips_and_the_config_field_is_validated(tmp_path):
    cfg, d = _bare_checkpoint(tmp_path, "pi0")  # no processor: written as IDENTITY in lerobot's files
    assert json.loads((d / "config.json").read_text())["normalization_mapping"]["STATE"] == "IDENTITY"
    d2 = Pi0Policy(cfg).save(tmp_path / "again")
    assert Pi0Policy.load(d2).processor is None  # the files say IDENTITY themselves
    assert Pi0Config().normalization == "auto"  # the default is never identity
    with pytest.raises(ConfigError, match="pi0.normalization"):
        Pi0Config(normalization="zscore")
    with pytest.raises(ConfigError, match="pi0.asset_id"):
        Pi0Config(asset_id="../elsewhere")


def test_fastnft_save_reloads_the_same_numbers_and_old_policy_final_dirs_still_load(tmp_path):
    pol = _policy(tmp_path, "pi05", "quantile", convention="openpi")
    d = pol.save(tmp_path / "ck", layout="openpi")
    openpi = json.loads((d / "assets" / "fastnft" / "norm_stats.json").read_text())["norm_stats"]
    assert set(openpi) == {"state", "actions"} and set(openpi["state"]) == {"mean", "std", "q01", "q99"}
    back = Pi0Policy.load(d)
    assert back.processor.norm_convention == "openpi" and back.processor.norm_mode == "quantile"
    obs = raw_obs(pol.cfg)
    x = torch.randn(2, pol.H, pol.D)
    assert torch.equal(pol.process(obs)["state"], back.process(obs)["state"])
    assert torch.equal(pol.to_env_actions(x), back.to_env_actions(x))
    # the layout fastnft wrote before: fastnft_processor.safetensors + a json without convention fields
    for p in d.glob("policy_*"):
        p.unlink()
    save_file(pol.processor.export()["tensors"], str(d / "fastnft_processor.safetensors"))
    (d / "fastnft_processor.json").write_text(json.dumps({"norm_mode": "quantile", "tokenizer_file": "tokenizer.model",
                                                          "tokenizer": "sentencepiece"}))
    old = Pi0Policy.load(d, asset_id="none-such")  # the legacy file wins before assets/ is looked at
    assert torch.equal(pol.process(obs)["state"], old.process(obs)["state"])
    assert torch.equal(pol.to_env_actions(x), old.to_env_actions(x))


def test_lerobot_03_statistics_buffers_are_read_and_inf_placeholders_are_not(tmp_path):
    p = tmp_path / "model.safetensors"
    mean, std = torch.randn(5), torch.rand(5) + 0.1
    save_file({"normalize_inputs.buffer_observation_state.mean": mean,
               "normalize_inputs.buffer_observation_state.std": std,
               "unnormalize_outputs.buffer_action.mean": mean[:4].clone(),
               "unnormalize_outputs.buffer_action.std": std[:4].clone(),
               "model.action_in_proj.weight": torch.zeros(2, 2)}, str(p))
    found = read_lerobot03_buffers(p)
    assert found.convention == "lerobot" and found.eps == 1e-8 and found.mode is None
    assert torch.equal(found.state.mean, mean) and torch.equal(found.action.std, std[:4])
    save_file({"normalize_inputs.buffer_observation_state.mean": torch.full((5,), float("inf")),
               "model.action_in_proj.weight": torch.zeros(2, 2)}, str(p))
    assert read_lerobot03_buffers(p) is None


def test_experiment_config_passes_normalization_and_random_init_refuses_a_mode_it_cannot_serve(tmp_path):
    from dataclasses import replace
    from pathlib import Path

    from fastnft.config import load_config
    from fastnft.policies.factory import build_flow_policy

    tiny = Path(__file__).resolve().parents[1] / "configs" / "pickcube_pi0_tiny.yaml"
    with pytest.raises(ConfigError, match=r"policy.pi0.normalization: quantile needs statistics.*random-init"):
        build_flow_policy(load_config(tiny, ["policy.pi0.normalization=quantile"]), init=None, state_dim=5, act_dim=4)
    pol = build_flow_policy(load_config(tiny), init=None, state_dim=5, act_dim=4)
    d = pol.save(tmp_path / "ck")
    for p in d.glob("policy_*"):  # they say IDENTITY, which counts as explicit: drop them
        p.unlink()
    _as_openpi_checkpoint(d)  # now a checkpoint with a tokenizer kind but no statistics and no mapping
    (d / "fastnft_processor.json").write_text(json.dumps({"tokenizer": "byte"}))
    with_ck = load_config(tiny, [f"policy.checkpoint={d}"])

    def runtime_only(**pi0):
        return replace(with_ck, policy=replace(with_ck.policy, pi0=pi0 or None))

    with pytest.raises(CheckpointError, match="no normalisation statistics"):
        build_flow_policy(runtime_only(), init=None, state_dim=5, act_dim=4)
    ok = build_flow_policy(runtime_only(normalization="identity"), init=None, state_dim=5, act_dim=4)
    assert ok.processor.norm_mode == "identity" and ok.cfg.normalization == "identity"


def test_statistics_of_another_width_are_refused_naming_the_field(tmp_path):
    cfg, d = _bare_checkpoint(tmp_path, "pi0")
    _write_lerobot_processor(d, cfg, "MEAN_STD", {f"{STATE_KEY}.mean": torch.zeros(cfg.state_dim + 2),
                                                  f"{STATE_KEY}.std": torch.ones(cfg.state_dim + 2),
                                                  "action.mean": torch.zeros(cfg.action_dim),
                                                  "action.std": torch.ones(cfg.action_dim)})
    with pytest.raises(CheckpointError, match=r"statistic 'mean' has 7 entries but the policy's observation.state "
                                              r"has 5 \(pi0.state_dim\)"):
        Pi0Policy.load(d)
