"""Motion-planned demos end to end: generate 2 PickCube demos, load them, replay them in the vector env."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastnft.config import DemoConfig, EnvConfig, ExperimentConfig

pytestmark = pytest.mark.maniskill

try:
    from fastnft.envs.maniskill import vulkan_available

    _OK, _WHY = vulkan_available()
except Exception as e:  # noqa: BLE001 - any import failure means skip; broken install
    _OK, _WHY = False, f"fastnft.envs.maniskill does not import: {e}"
if not _OK:
    pytest.skip(f"ManiSkill3 unusable here: {_WHY}", allow_module_level=True)

from fastnft.envs.maniskill import ManiSkillVectorEnv
from fastnft.experiments.demos import DemoError, demo_file, generate_demos, load_demos

SEED = 500_000
IS_GRASPED = 18  # PickCube-v1 state layout: qpos 9, qvel 9, is_grasped 1, ...


@pytest.fixture(scope="module")
def cfg():
    return ExperimentConfig(env=EnvConfig(sim_backend="cpu", max_episode_steps=100),
                            demos=DemoConfig(num_demos=2, seed=SEED))


@pytest.fixture(scope="module")
def demo_path(cfg, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        path = generate_demos(cfg, tmp_path_factory.mktemp("demos"), progress=False)
        # the simulator runs on one thread; the SFT that follows in the same process (the pipeline) must not
        assert torch.get_num_threads() == 2, "demo generation left torch on another thread count"
    finally:
        torch.set_num_threads(threads)
    return path


def test_generate_and_load_round_trip(cfg, demo_path):
    assert demo_path == demo_file(demo_path.parent, "PickCube-v1", "pd_ee_delta_pos") and demo_path.is_file()
    assert not list(demo_path.parent.glob("*.tmp")), "temp file left behind"
    d = load_demos(demo_path, env_id="PickCube-v1", control_mode="pd_ee_delta_pos")
    assert len(d) == 2 and (d.obs_dim, d.act_dim, d.max_episode_steps) == (42, 4, 100)
    assert [e.seed for e in d.episodes] == sorted(e.seed for e in d.episodes) and d.episodes[0].seed >= SEED
    for e in d.episodes:
        assert e.success
        assert e.obs.dtype == np.float32 and e.actions.dtype == np.float32
        assert e.obs.shape == (e.length + 1, 42) and e.actions.shape == (e.length, 4)
        assert 1 <= e.length <= 100
        assert np.abs(e.actions).max() <= 1.0
        assert e.obs[0, IS_GRASPED] == 0.0, "stale is_grasped on the first observation"
        assert e.obs[-1, IS_GRASPED] == 1.0, "a finished PickCube demo holds the cube"


def test_existing_file_is_not_regenerated(cfg, demo_path, monkeypatch):
    import fastnft.experiments.demos as demos_mod

    def no_generator(*a, **k):
        raise AssertionError("generate_demos started the motion planner for a file that already holds the demos")

    monkeypatch.setattr(demos_mod, "_Generator", no_generator)  # behaviour, not a time limit: no generation at all
    mtime = demo_path.stat().st_mtime_ns
    assert generate_demos(cfg, demo_path.parent, num_demos=1, progress=False) == demo_path
    assert demo_path.stat().st_mtime_ns == mtime


def test_demos_replay_to_success_in_vector_env(demo_path):
    """Demo actions replayed from their seeds in the adapter succeed, with the demo's exact observations."""
    d = load_demos(demo_path)
    env = ManiSkillVectorEnv(EnvConfig(sim_backend="cpu", max_episode_steps=100), num_envs=2)
    try:
        env.reset([0, 1])  # a different episode first: a reused worker must replay the demo the same way
        env.step(torch.rand(2, 4) * 2 - 1)
        obs = env.reset([e.seed for e in d.episodes])
        for i, e in enumerate(d.episodes):
            np.testing.assert_array_equal(obs[i].numpy(), e.obs[0])
        horizon = max(e.length for e in d.episodes)
        acts = torch.zeros(2, horizon, 4)
        for i, e in enumerate(d.episodes):
            acts[i, : e.length] = torch.from_numpy(e.actions)
        seen = [[obs[i].numpy()] for i in range(2)]
        for t in range(horizon):
            active = ~env.done
            res = env.step(acts[:, t])
            for i in range(2):
                if active[i]:
                    seen[i].append(res.obs[i].numpy())
        assert env.success_once.all() and env.done.all()
        for i, e in enumerate(d.episodes):
            got = np.stack(seen[i])
            assert got.shape == e.obs.shape, (got.shape, e.obs.shape)  # ends at the same (first-success) step
            # CPU PhysX keeps a little state across resets (a worker that just ran another episode settles the
            # cube ~1e-7 m differently); over a demo that grows to ~1e-4. 1e-3 (1 mm / 1 mrad) still catches any
            # real mismatch of seeds, control mode or observation layout.
            np.testing.assert_allclose(got, e.obs, rtol=0, atol=1e-3)
        # After an episode that ended holding the cube, the next reset must not report a stale grasp.
        obs = env.reset([3, 4])
        assert (obs[:, IS_GRASPED] == 0).all()
    finally:
        env.close()


def test_load_demos_errors_name_file_and_fix(tmp_path, demo_path):
    missing = tmp_path / "nope.npz"
    with pytest.raises(DemoError, match=r"nope\.npz.*generate_demos"):
        load_demos(missing)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DemoError, match=r"bad\.npz.*corrupt"):
        load_demos(bad)
    with pytest.raises(DemoError, match=r"PickCube-v1.*StackCube-v1"):
        load_demos(demo_path, env_id="StackCube-v1")
    with pytest.raises(DemoError, match="pd_joint_pos"):
        load_demos(demo_path, control_mode="pd_joint_pos")
