"""Configs: every shipped YAML loads; bad keys, types and ranges fail with a message naming the key and fix."""

from pathlib import Path

import pytest

from fastnft.config import ConfigError, ExperimentConfig, config_to_dict, load_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert load_config(None, []) == ExperimentConfig()


def test_every_field_is_documented():
    import ast
    import inspect

    import fastnft.config as mod

    tree = ast.parse(inspect.getsource(mod))
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Config")):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                nxt = body[i + 1] if i + 1 < len(body) else None
                is_doc = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant)
                is_section = cls.name == "ExperimentConfig" and node.target.id in (
                    "env", "policy", "demos", "sft", "nft", "engine", "train")
                if not is_doc and not is_section:
                    missing.append(f"{cls.name}.{node.target.id}")
    assert not missing, f"fields without a docstring: {missing}"


def test_overrides_are_typed():
    cfg = load_config("configs/pickcube_stepnft.yaml", ["train.iterations=3", "nft.max_drift=null",
                                                        "train.betas=[0.8, 0.9]"])
    assert cfg.train.iterations == 3 and cfg.nft.max_drift is None and cfg.train.betas == (0.8, 0.9)
    assert config_to_dict(cfg)["train"]["betas"] == [0.8, 0.9]
    # YAML 1.1 reads 1e-4 as a string: float fields accept float literals
    assert load_config(None, ["train.lr=1e-4"]).train.lr == 1e-4


@pytest.mark.parametrize("override,needle", [
    (["train.iteration=3"], "did you mean 'train.iterations'"),
    (["trian.lr=1"], "unknown config key 'trian'"),
    (["train.lr=fast"], "config key 'train.lr': expected float"),
    (["train.iterations=2.5"], "expected int"),
    (["nft.loss=mse"], "one of 'ranking', 'wmse'"),
    (["policy.n_action_steps=20"], "policy.n_action_steps"),
    (["policy.chunk=4"], "renamed to policy.n_action_steps"),
    (["engine.zero_stage=4"], "engine.zero_stage"),
    (["nft.step=fixed:9"], "fixed solver index must be <"),
    (["nft.step=sometimes"], "nft.step"),
    (["env.eval_seed=-1"], "held-out seeds"),
    (["train.lr"], "section.key=value"),
])
def test_bad_values_name_key_and_fix(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/pickcube_stepnft.yaml", override)
    assert needle in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_rollout_cuda_graphs_on_off_survive_yaml_booleans():
    """YAML 1.1 reads `on`/`off` as booleans; the rollout.cuda_graphs field maps them back."""
    from fastnft.config import ConfigError, load_config

    assert load_config(None, ["rollout.cuda_graphs=off"]).rollout.cuda_graphs == "off"
    assert load_config(None, ["rollout.cuda_graphs=on"]).rollout.cuda_graphs == "on"
    assert load_config(None, []).rollout.cuda_graphs == "auto"
    with pytest.raises(ConfigError, match="rollout.cuda_graphs"):
        load_config(None, ["rollout.cuda_graphs=sometimes"])


@pytest.mark.parametrize("workers", [0, 9])
def test_num_workers_out_of_range_names_the_key(workers):
    with pytest.raises(ConfigError, match=r"env.num_workers.*1..env.num_envs=8"):
        load_config("configs/pickcube_stepnft.yaml", [f"env.num_workers={workers}"])


def test_num_workers_null_and_in_range_load():
    assert load_config("configs/pickcube_stepnft.yaml", []).env.num_workers is None
    assert load_config("configs/pickcube_stepnft.yaml", ["env.num_workers=2"]).env.num_workers == 2
