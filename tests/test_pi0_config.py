"""Pi0Config: presets, validation messages naming the key, dict round trip, the draft experiment YAML's block."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastnft.config import ConfigError
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import ExpertConfig, Pi0Config

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "pickcube_pi0_tiny.yaml"


def test_presets_have_pi0_sizes():
    c = Pi0Config.pi0()
    assert (c.chunk_size, c.max_action_dim, c.tokenizer_max_length) == (50, 32, 48)
    e = c.expert
    assert (e.width, e.depth, e.mlp_dim, e.num_heads, e.num_kv_heads, e.head_dim) == (1024, 18, 4096, 8, 1, 256)
    assert Pi0Config.pi05().tokenizer_max_length == 200 and Pi0Config.pi05().suffix_len == 50
    assert c.suffix_len == 51 and c.prefix_len == 256 + 48


@pytest.mark.parametrize("kw,key", [
    ({"n_action_steps": 60}, "pi0.n_action_steps"),
    ({"action_dim": 40}, "pi0.action_dim"),
    ({"variant": "pi1"}, "pi0.variant"),
    ({"expert": ExpertConfig(depth=12)}, "pi0.expert.depth"),
    ({"expert": ExpertConfig(head_dim=128)}, "pi0.expert.head_dim"),
])
def test_invalid_values_name_the_key(kw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Pi0Config(**kw)


def test_dict_round_trip_and_unknown_keys():
    c = Pi0Config.tiny("pi05")
    assert Pi0Config.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"pi0\.chunk\b"):
        Pi0Config.from_dict({**c.to_dict(), "chunk": 5})
    with pytest.raises(ConfigError, match=r"pi0\.vlm\.widht"):
        Pi0Config.from_dict({**c.to_dict(), "vlm": {"widht": 3}})


def test_tiny_experiment_yaml_pi0_block_builds_a_policy():
    from fastnft.config import load_config
    from fastnft.policies.factory import pi0_config_from

    cfg = pi0_config_from(load_config(TINY_YAML), state_dim=29, act_dim=4)  # PickCube rgb: 29 state values
    pol = Pi0Policy(cfg)
    assert pol.H == 6 and pol.n_action_steps == 4 and pol.D == 8 and cfg.prefix_len == 16 + 24
    assert cfg.cameras == ("base_camera",) and cfg.state_dim == 29 and cfg.action_dim == 4
