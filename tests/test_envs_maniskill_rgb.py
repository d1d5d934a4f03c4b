"""Camera + language observations (issue 8, part 4): ``obs_mode: rgb`` through the VectorEnv API.

Three groups: the config checks and the base class's dict latch run everywhere (no simulator); the ManiSkill
tests build one 2-env PickCube adapter with 48 x 48 frames (CPU backend, lavapipe) and skip like
tests/test_envs_maniskill.py when ManiSkill or a Vulkan device is missing.
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
    cfg = load_config(None, ["policy.kind=pi0", "env.obs_mode=rgb", "env.cameras=[base_camera]",
                              "env.image_size=64"]).env
    assert (cfg.cameras, cfg.image_size) == (["base_camera"], 64)
    assert cfg.language_instruction() == TASK_INSTRUCTIONS["PickCube-v1"]
    assert "red cube" in cfg.language_instruction()
    own = EnvConfig(task="PushT-v1", obs_mode="rgb", instruction="push the T onto its outline")
    assert own.language_instruction() == "push the T onto its outline"
    assert EnvConfig().obs_mode == "state" and EnvConfig().cameras == ["base_camera"]  # defaults unchanged


def test_demos_refuse_rgb(tmp_path):
    from fastnft.config import ExperimentConfig, PolicyConfig
    from fastnft.experiments.demos import generate_demos

    cfg = ExperimentConfig(env=EnvConfig(obs_mode="rgb"), policy=PolicyConfig(kind="pi0"))
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


def test_unknown_camera_names_the_key():
    """The check ManiSkillVectorEnv runs on the task's observation space (a stand-in space here, no simulator)."""
    from types import SimpleNamespace

    from gymnasium import spaces

    from fastnft.envs.maniskill import _check_cameras

    rgb = spaces.Box(0, 255, (48, 40, 3), "uint8")
    space = spaces.Dict({"sensor_data": spaces.Dict({"base_camera": spaces.Dict({"rgb": rgb}),
                                                     "depth_only": spaces.Dict({"depth": rgb})})})
    base = SimpleNamespace(single_observation_space=space, spec=SimpleNamespace(id="PickCube-v1"))
    assert _check_cameras(base, ["base_camera"]) == {"base_camera": (48, 40, 3)}
    with pytest.raises(ConfigError, match=r"'env.cameras'.*PickCube-v1.*'hand_camera'.*cameras are base_camera$"):
        _check_cameras(base, ["base_camera", "hand_camera"])


# -- ManiSkill3 PickCube-v1, rgb ------------------------------------------------------------------------------------
try:
    from fastnft.envs.maniskill import vulkan_available

    _OK, _WHY = vulkan_available()
except Exception as e:  # noqa: BLE001 - any import failure means skip; broken install
    _OK, _WHY = False, f"fastnft.envs.maniskill does not import: {e}"


def needs_sim(test):
    """Mark a test as a ManiSkill test and skip it where ManiSkill or a Vulkan device is missing."""
    return pytest.mark.maniskill(pytest.mark.skipif(not _OK, reason=f"ManiSkill3 unusable here: {_WHY}")(test))


SIZE, MAX_STEPS, STATE_DIM = 48, 4, 29  # PickCube-v1 rgb state: qpos 9, qvel 9, is_grasped, tcp_pose 7, goal_pos 3
INSTRUCTION = "put the red cube where the green dot is"


@pytest.fixture(scope="module")
def env():
    from fastnft.envs.maniskill import ManiSkillVectorEnv

    cfg = EnvConfig(sim_backend="cpu", obs_mode="rgb", image_size=SIZE, instruction=INSTRUCTION,
                    max_episode_steps=MAX_STEPS)
    e = ManiSkillVectorEnv(cfg, num_envs=2)
    yield e
    e.close()


def _check_obs(obs, n=2):
    assert list(obs) == [IMG, STATE_KEY, TASK_KEY]
    assert obs[IMG].shape == (n, SIZE, SIZE, 3) and obs[IMG].dtype == torch.uint8
    assert obs[STATE_KEY].shape == (n, STATE_DIM) and obs[STATE_KEY].dtype == torch.float32
    assert torch.isfinite(obs[STATE_KEY]).all()
    assert obs[TASK_KEY] == [INSTRUCTION] * n


@needs_sim
def test_rgb_reset_gives_frames_state_and_instruction(env):
    assert (env.obs_dim, env.act_dim, env.cameras, env.instruction) == (STATE_DIM, 4, ("base_camera",), INSTRUCTION)
    assert env.image_shapes == {"base_camera": (SIZE, SIZE, 3)}
    obs = env.reset([0, 1])
    _check_obs(obs)
    assert obs[IMG].float().std() > 5, "the frame should show a scene, not a flat colour"
    assert (obs[STATE_KEY][:, 18] == 0).all(), "nothing is grasped at a reset"
    assert not torch.equal(obs[STATE_KEY][0, 26:29], obs[STATE_KEY][1, 26:29]), "seeds place different goals"
    again = env.reset([0, 1])
    assert torch.equal(again[IMG], obs[IMG]) and torch.equal(again[STATE_KEY], obs[STATE_KEY])


@needs_sim
def test_rgb_step_chunk_and_ended_envs_keep_their_last_frame(env):
    gen = torch.Generator().manual_seed(0)
    env.reset([3, 4])
    res = env.step_chunk(torch.rand(2, MAX_STEPS + 2, 4, generator=gen) * 2 - 1)
    _check_obs(res.obs)
    assert res.done.all() and res.reward.shape == (2,)
    assert all(1 <= s <= MAX_STEPS for s in res.steps.tolist())
    # Every episode ended: nothing is simulated any more, the observation stays at the last real step.
    sim = env.sim_steps
    after = env.step(torch.ones(2, 4))
    assert env.sim_steps == sim, "finished episodes must not be stepped"
    assert torch.equal(after.obs[IMG], res.obs[IMG]) and torch.equal(after.obs[STATE_KEY], res.obs[STATE_KEY])
    assert (after.reward == 0).all() and after.done.all()
