"""Camera + language observations (issue 8, part 4): ``obs_mode: rgb`` through the VectorEnv API.

This part: the config fields and their checks (no simulator), and demonstrations refusing rgb.
"""

from __future__ import annotations

import pytest

from fastnft.config import TASK_INSTRUCTIONS, ConfigError, EnvConfig, load_config


# -- config ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "key"), [
    (["env.obs_mode=rgbd"], "env.obs_mode"),
    (["env.obs_mode=rgb", "env.cameras=[]"], "env.cameras"),
    (["env.obs_mode=rgb", "env.cameras=[base_camera, base_camera]"], "env.cameras"),
    (["env.obs_mode=rgb", "env.cameras=base_camera"], "env.cameras"),  # a string, not a list
    (["env.obs_mode=rgb", "env.task=PushT-v1"], "env.instruction"),  # no built-in instruction
    (["env.obs_mode=rgb", "env.task=bandit"], "env.obs_mode"),  # no cameras
    (["env.obs_mode=rgb", "env.image_size=2"], "env.image_size"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_config_rgb_fields_and_instruction():
    cfg = load_config(None, ["env.obs_mode=rgb", "env.cameras=[base_camera]", "env.image_size=64"]).env
    assert (cfg.cameras, cfg.image_size) == (["base_camera"], 64)
    assert cfg.language_instruction() == TASK_INSTRUCTIONS["PickCube-v1"]
    assert "red cube" in cfg.language_instruction()
    own = EnvConfig(task="PushT-v1", obs_mode="rgb", instruction="push the T onto its outline")
    assert own.language_instruction() == "push the T onto its outline"
    assert EnvConfig().obs_mode == "state" and EnvConfig().cameras == ["base_camera"]  # defaults unchanged


def test_demos_refuse_rgb(tmp_path):
    from fastnft.config import ExperimentConfig
    from fastnft.demos import generate_demos

    cfg = ExperimentConfig(env=EnvConfig(obs_mode="rgb"))
    with pytest.raises(ConfigError, match=r"'env.obs_mode'.*state-only"):
        generate_demos(cfg, tmp_path, num_demos=1, progress=False)
