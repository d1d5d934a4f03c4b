"""Camera + language observations (issue 8, part 4): ``obs_mode: rgb`` through the VectorEnv API.

No simulator here: the config fields and their checks, demonstrations refusing rgb, and the VectorEnv base class
with dict observations (a tiny scripted env).
"""

from __future__ import annotations

import pytest
import torch

from fastnft.config import TASK_INSTRUCTIONS, ConfigError, EnvConfig, load_config
from fastnft.envs.base import STATE_KEY, TASK_KEY, VectorEnv, image_key

IMG = image_key("base_camera")


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


# -- base class: dict observations without a simulator --------------------------------------------------------------
class DictEnv(VectorEnv):
    """Frames and state count env steps; env j succeeds at step ``succeed_at[j]`` (0 = never)."""

    def __init__(self, succeed_at: list[int], max_steps: int = 10) -> None:
        super().__init__()
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = len(succeed_at), 3, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self.succeed_at = torch.tensor(succeed_at)

    def _make_obs(self) -> dict:
        n = self.num_envs
        frame = (self.t.view(n, 1, 1, 1) + 10 * torch.arange(n).view(n, 1, 1, 1)).to(torch.uint8)
        return {IMG: frame.expand(n, 5, 7, 3).clone(),  # [N, H, W, 3] uint8, odd H != W
                STATE_KEY: torch.stack([self.t, self.t, self.t], 1).double(),  # float64: the base class makes it f32
                TASK_KEY: ["do it"] * n}

    def _reset(self, seeds):
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        return self._make_obs()

    def _step(self, actions):
        self.t += 1
        success = (self.succeed_at > 0) & (self.t == self.succeed_at)
        return self._make_obs(), torch.ones(self.num_envs), success


def test_base_class_latches_dict_observations_per_entry():
    env = DictEnv([2, 0, 4], max_steps=10)
    obs = env.reset([0, 1, 2])
    assert obs[IMG].dtype == torch.uint8 and obs[STATE_KEY].dtype == torch.float32 and obs[TASK_KEY] == ["do it"] * 3
    res = env.step_chunk(torch.zeros(3, 5, 2))
    assert res.steps.tolist() == [2, 5, 4] and res.done.tolist() == [True, False, True]
    # Ended envs keep the frame and state of their last real step; the running env shows step 5.
    assert res.obs[STATE_KEY][:, 0].tolist() == [2.0, 5.0, 4.0] and res.obs[STATE_KEY].dtype == torch.float32
    assert res.obs[IMG].dtype == torch.uint8 and res.obs[IMG].shape == (3, 5, 7, 3)
    assert res.obs[IMG][:, 0, 0, 0].tolist() == [2, 15, 24]
    assert res.obs[TASK_KEY] == ["do it"] * 3
    step = env.step(torch.zeros(3, 2))
    assert step.obs[IMG][:, 0, 0, 0].tolist() == [2, 16, 24] and step.obs[STATE_KEY][:, 0].tolist() == [2, 6, 4]
    # The results are copies: changing them does not change what the env latched.
    step.obs[IMG].zero_()
    step.obs[TASK_KEY].append("x")
    again = env.step(torch.zeros(3, 2))
    assert again.obs[IMG][:, 0, 0, 0].tolist() == [2, 17, 24] and len(again.obs[TASK_KEY]) == 3
