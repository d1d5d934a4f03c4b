"""The pi0 key map against real key sets: lerobot 0.4.4 pi0 / pi0.5 and lerobot 0.3.2 pi0 at full size (names and
shapes built by lerobot's own code, ``<repo>/../shared/fixtures/pi0-checkpoint-keys``), transformers' own PI0 at
full size, and tiny checkpoints written in each layout. Full-size models are built on the meta device: no weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastnft.policies import pi0_keymap as km
from fastnft.policies.pi0 import Pi0Model, Pi0Policy
from fastnft.policies.pi0_checkpoint import CheckpointError, check_keys
from fastnft.policies.pi0_config import Pi0Config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("FASTNFT_SHARED", ROOT.parent / "shared")) / "fixtures" / "pi0-checkpoint-keys"
CASES = [("lerobot-0.4.4-pi0", "pi0", "lerobot"), ("lerobot-0.4.4-pi05", "pi05", "lerobot"),
         ("lerobot-0.3.2-pi0", "pi0", "lerobot_legacy")]


def _fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"fixture {path} is absent: it lives in the shared/ folder beside the clone "
                    f"(<repo>/../shared, or set FASTNFT_SHARED to that folder)")
    return json.loads(path.read_text())


def _on_disk(fx: dict) -> dict[str, list[int]]:
    """What ``safetensors.torch.save_model`` writes: one name per tied group, the alphabetically first."""
    keys = dict(fx["keys"])
    for group in fx["tied_groups"]:
        for name in sorted(group)[1:]:
            del keys[name]
    return keys


def _meta_model(variant: str) -> Pi0Model:
    cfg = Pi0Config.pi0() if variant == "pi0" else Pi0Config.pi05()
    with torch.device("meta"):
        return Pi0Model(cfg, init_weights=False)


def _expected(model: Pi0Model) -> dict[str, tuple[int, ...]]:
    return {c: tuple(v.shape) for c, (_, v) in km.model_expected(model.state_dict()).items()}


@pytest.mark.parametrize("name,variant,layout", CASES)
def test_fixture_key_sets_map_exactly_onto_a_full_size_model(name, variant, layout):
    fx = _fixture(name)
    disk = _on_disk(fx)
    assert any(k.endswith("lm_head.weight") and "paligemma." in k for k in disk)
    assert not any(k.endswith("embed_tokens.weight") and "paligemma." in k for k in disk)  # like pi0_base
    assert km.detect_layout(disk) == layout
    assert km.detect_variant(disk) == variant
    found, _ = km.to_canonical(disk)
    expected = _expected(_meta_model(variant))
    missing, unexpected = set(expected) - set(found), set(found) - set(expected)
    mismatched = [k for k in expected.keys() & found.keys() if tuple(found[k]) != expected[k]]
    assert (len(missing), len(unexpected), len(mismatched)) == (0, 0, 0), (sorted(missing)[:5],
                                                                         sorted(unexpected)[:5], mismatched[:5])
    check_keys(expected, found, name)  # the loader's own check agrees


@pytest.mark.parametrize("name,variant", [("lerobot-0.4.4-pi0", "pi0"), ("lerobot-0.4.4-pi05", "pi05")])
def test_saved_key_sets_are_what_lerobot_and_openpi_load_strictly(name, variant):
    fx = _fixture(name)
    model = _meta_model(variant)
    canon = {c: v for c, (_, v) in km.model_expected(model.state_dict()).items()}
    kw = {"vocab_size": model.cfg.vlm.vocab_size, "expert_width": model.cfg.expert.width, "variant": variant}
    lerobot = km.from_canonical(canon, "lerobot", **kw)
    # lerobot 0.4.x: load_state_dict(strict=True) over its whole module tree, both tied names included
    assert {k: list(v.shape) for k, v in lerobot.items()} == fx["keys"]
    openpi = km.from_canonical(canon, "openpi", **kw)
    # openpi: safetensors.torch.load_model, one name per tied group (the one save_model keeps)
    want = {k[len("model."):]: s for k, s in _on_disk(fx).items()}
    assert {k: list(v.shape) for k, v in openpi.items()} == want


def test_transformers_layout_matches_transformers_own_full_size_module_tree():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "PI0ForConditionalGeneration"):
        pytest.skip(f"transformers {tf.__version__} has no PI0ForConditionalGeneration (5.x only)")
    with torch.device("meta"):
        ref = tf.PI0ForConditionalGeneration(tf.PI0Config())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    model = _meta_model("pi0")
    canon = {c: v for c, (_, v) in km.model_expected(model.state_dict()).items()}
    ours = km.from_canonical(canon, "transformers", vocab_size=model.cfg.vlm.vocab_size,
                             expert_width=model.cfg.expert.width, variant="pi0")
    assert {k: tuple(v.shape) for k, v in ours.items()} == ref_shapes
    assert km.detect_layout(ref_shapes) == "transformers"
    back, _ = km.to_canonical(ref_shapes)
    check_keys(_expected(model), back, "transformers PI0ForConditionalGeneration")
    with pytest.raises(ValueError, match="pi0 only"):
        km.from_canonical(canon, "transformers", vocab_size=1, expert_width=1, variant="pi05")


def test_fastnft_module_names_of_any_transformers_version_normalise_to_the_same_canonical_names():
    pg = "paligemma_with_expert.paligemma."
    forms = {  # transformers 5.x, 4.52-4.57, < 4.52 names of the same two tensors
        "v5": [pg + "model.vision_tower.encoder.layers.0.mlp.fc1.weight", pg + "model.language_model.norm.weight"],
        "v4.53": [pg + "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                  pg + "model.language_model.norm.weight"],
        "v4.51": [pg + "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                  pg + "language_model.model.norm.weight"],
        "tf-save": [pg + "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
                    pg + "model.language_model.model.norm.weight"],
    }
    canon = {name: [km.canonical(k) for k in keys] for name, keys in forms.items()}
    assert len({tuple(v) for v in canon.values()}) == 1
    assert canon["v5"] == forms["v4.53"]  # canonical = openpi's names
    assert all(km.canonical(c) == c for c in canon["v5"])  # idempotent


def test_mismatch_error_groups_by_prefix_and_names_the_cause_not_config_json():
    fx = _fixture("lerobot-0.4.4-pi0")
    disk = {k.replace("vision_tower.vision_model.", "vision_tower.vit."): s for k, s in _on_disk(fx).items()}
    found, _ = km.to_canonical(disk)
    expected = _expected(_meta_model("pi0"))
    with pytest.raises(CheckpointError) as e:
        check_keys(expected, found, "ck", "lerobot")
    msg = str(e.value)
    n = sum("vision_tower.vit." in k for k in disk)
    assert n > 400
    assert f"missing keys ({n}): {n} under paligemma_with_expert.paligemma.model.vision_tower.vision_model.*" in msg
    assert f"unexpected keys ({n}): {n} under paligemma_with_expert.paligemma.model.vision_tower.vit.*" in msg
    assert "Likely cause: the file names" in msg and "config.json" not in msg
    assert len(msg) < 1500  # grouped, not 2 x 437 names
    # a pi0.5 file against a pi0 model: the variant is named
    found05, _ = km.to_canonical(_on_disk(_fixture("lerobot-0.4.4-pi05")))
    with pytest.raises(CheckpointError, match="the weights are pi05 but the model was built as pi0"):
        check_keys(expected, found05, "ck")


def _tiny(tmp_path, variant):
    torch.manual_seed(0)
    pol = Pi0Policy(Pi0Config.tiny(variant))
    with torch.no_grad():
        for p in pol.trainable_parameters():
            p.normal_(0, 0.3)
    return pol.eval()


def _same(a: Pi0Policy, b: Pi0Policy) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("drop", ["embed_tokens", "lm_head"])
def test_tied_embedding_is_read_from_whichever_name_the_file_holds(tmp_path, drop):
    pol = _tiny(tmp_path, "pi0")
    d = pol.save(tmp_path / "ck", layout="lerobot")
    sd = load_file(str(d / "model.safetensors"))
    names = [k for k in sd if k.endswith(f"paligemma.{'model.language_model.embed_tokens' if drop == 'embed_tokens' else 'lm_head'}.weight")]
    assert len(names) == 1
    del sd[names[0]]
    save_file(sd, str(d / "model.safetensors"))
    back = Pi0Policy.load(d)
    _same(pol, back)
    assert back.model.vlm.lm_head.weight is back.model.vlm.model.language_model.embed_tokens.weight


def test_openpi_directory_without_variant_is_read_as_pi05_from_its_weights(tmp_path):
    pol = _tiny(tmp_path, "pi05")
    d = pol.save(tmp_path / "ck", layout="openpi")
    (d / "fastnft_config.json").unlink()
    cfg = pol.cfg
    # what openpi's convert_jax_model_to_pytorch.py writes: no variant, no sizes but the action ones
    (d / "config.json").write_text(json.dumps({"action_dim": cfg.max_action_dim, "action_horizon": cfg.chunk_size,
                                               "paligemma_variant": "gemma_2b",
                                               "action_expert_variant": "gemma_300m", "precision": "float32"}))
    from fastnft.policies.pi0_checkpoint import _config_from_json, read_checkpoint

    ck_keys = load_file(str(d / "model.safetensors"))
    assert km.detect_variant(ck_keys) == "pi05"
    conf = json.loads((d / "config.json").read_text())
    got = _config_from_json(conf, None, d, {}, km.detect_variant(ck_keys))
    assert got.variant == "pi05" and got.tokenizer_max_length == 200
    # a full load needs the tiny sizes, which openpi's config cannot hold: give them through fastnft_config.json
    full = cfg.to_dict()
    full["variant"] = "pi0"  # ... and a wrong variant there is refused, naming the weights' variant
    (d / "fastnft_config.json").write_text(json.dumps(full))
    with pytest.raises(CheckpointError, match="says variant 'pi0' but the weights are 'pi05'"):
        read_checkpoint(d)
    full["variant"] = "pi05"
    (d / "fastnft_config.json").write_text(json.dumps(full))
    _same(pol, Pi0Policy.load(d))


@pytest.mark.parametrize("layout", ["lerobot", "openpi", "transformers"])
def test_each_save_layout_round_trips_bit_exact(tmp_path, layout):
    pol = _tiny(tmp_path, "pi0")
    d = pol.save(tmp_path / layout, layout=layout)
    keys = list(load_file(str(d / "model.safetensors")))
    assert km.detect_layout(keys) == ("openpi" if layout == "openpi" else layout)
    back = Pi0Policy.load(d)
    assert back.cfg == pol.cfg
    _same(pol, back)
    if layout == "lerobot":
        pg = "model.paligemma_with_expert.paligemma."
        assert {pg + "lm_head.weight", pg + "model.language_model.embed_tokens.weight"} <= set(keys)
        assert any(k.startswith(pg + "model.vision_tower.vision_model.") for k in keys)
    if layout == "openpi":
        assert "paligemma_with_expert.paligemma.lm_head.weight" in keys
        assert "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight" not in keys


def test_convert_rewrites_a_lerobot_save_as_openpi(tmp_path):
    from fastnft.policies.pi0_convert import main

    pol = _tiny(tmp_path, "pi0")  # float32 prefix: the converter keeps the file's dtype
    src = pol.save(tmp_path / "lerobot", layout="lerobot")
    main([str(src), str(tmp_path / "openpi"), "--layout", "openpi"])
    keys = list(load_file(str(tmp_path / "openpi" / "model.safetensors")))
    assert km.detect_layout(keys) == "openpi"
    back = Pi0Policy.load(tmp_path / "openpi", vlm_dtype="float32")
    _same(pol, back)


def test_group_keys_reports_one_line_per_shared_prefix():
    vis = [f"paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight"
           for i in range(27)] + ["paligemma_with_expert.paligemma.model.vision_tower.vision_model.post_layernorm.bias"]
    emb = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    assert km.group_keys(vis) == [("paligemma_with_expert.paligemma.model.vision_tower.vision_model.*", 28)]
    assert km.group_keys([*vis, emb]) == [("paligemma_with_expert.paligemma.model.vision_tower.vision_model.*", 28),
                                          (emb, 1)]
    many = [f"k{i}.w" for i in range(12)]
    groups = km.group_keys(many, max_groups=4)
    assert len(groups) == 4 and groups[-1] == ("other keys", 9)


def _module_tree(shapes: dict[str, tuple[int, ...]], tie: tuple[str, str] | None = None) -> torch.nn.Module:
    """A module tree with exactly these parameter names (zeros); ``tie`` = (name, alias) share one parameter."""
    root = torch.nn.Module()

    def parent(name: str) -> tuple[torch.nn.Module, str]:
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        return mod, leaf

    for name, shape in shapes.items():
        mod, leaf = parent(name)
        mod.register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape)))
    if tie:
        src, src_leaf = parent(tie[0])
        dst, dst_leaf = parent(tie[1])
        dst.register_parameter(dst_leaf, getattr(src, src_leaf))
    return root


def test_openpi_save_loads_strictly_with_safetensors_load_model_over_a_tied_tree(tmp_path):
    """openpi loads with ``safetensors.torch.load_model(PI0Pytorch, file)`` (strict): over a tree with openpi's names
    and the tied pair, the file with ``lm_head`` only must load every tensor, the embedding through the tie."""
    from safetensors.torch import load_model

    pol = _tiny(tmp_path, "pi0")
    d = pol.save(tmp_path / "openpi", layout="openpi")
    sd = load_file(str(d / "model.safetensors"))
    tree = _module_tree({k: tuple(v.shape) for k, v in sd.items()}, tie=(km.LM_HEAD, km.EMBED))
    assert km.EMBED in tree.state_dict() and km.EMBED not in sd
    missing, unexpected = load_model(tree, str(d / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    emb = pol.model.vlm.model.language_model.embed_tokens.weight
    assert torch.equal(tree.state_dict()[km.EMBED], emb)


def test_lerobot_legacy_statistics_buffers_are_not_weights():
    """lerobot 0.3.x files hold ``normalize_inputs.*`` etc. beside ``model.*``: dropped, layout still lerobot."""
    from fastnft.policies import pi0_keymap as km

    raw = {"model.paligemma_with_expert.paligemma.language_model.model.norm.weight": (4,),
           "model.action_in_proj.weight": (4, 4),
           "normalize_inputs.buffer_observation_state.mean": (4,),
           "unnormalize_outputs.buffer_action.std": (4,)}
    out, layout = km.to_canonical(raw)
    assert layout == "lerobot_legacy"
    assert not any(k.startswith(km.STATS_PREFIXES) for k in out)
    assert "action_in_proj.weight" in out
