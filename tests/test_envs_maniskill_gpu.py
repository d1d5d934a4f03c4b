"""ManiSkill3 on the PhysX-GPU backend, co-located with the policy (issue 7, part 4). Needs CUDA (skipped here).

Observations, done and success flags stay CUDA tensors end to end; a short training run goes through the
trainer with the rollout buffer on the device (the doctor's maniskill_gpu check).
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.maniskill,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the PhysX-GPU backend needs a CUDA GPU")]


def test_gpu_scene_outputs_stay_on_the_device():
    from fastnft.config import EnvConfig
    from fastnft.envs.maniskill import ManiSkillVectorEnv, vulkan_available

    ok, why = vulkan_available()
    if not ok:
        pytest.skip(why)
    env = ManiSkillVectorEnv(EnvConfig(sim_backend="gpu", max_episode_steps=20), num_envs=4)
    try:
        assert env.device.type == "cuda"
        obs = env.reset([0, 1, 2, 3])
        assert obs.device == env.device and obs.shape == (4, env.obs_dim)
        res = env.step_chunk(torch.zeros(4, 5, env.act_dim, device=env.device))
        for t in (res.obs, res.reward, res.steps, res.done, res.success_once):
            assert t.device == env.device
        assert res.steps.tolist() == [5, 5, 5, 5]
    finally:
        env.close()


def test_two_training_iterations_on_the_gpu_scene():
    from fastnft.doctor.checks import maniskill_gpu

    assert "2 iterations" in maniskill_gpu()
