"""Few-shot SFT (flow matching, u = eps - a) fits a small known conditional distribution."""

import torch

from fastnft.chunks import ChunkDataset, chunks_from_episodes
from fastnft.config import ExperimentConfig, PolicyConfig, SFTConfig
from fastnft.experiments.demos import demo_path
from fastnft.experiments.sft import build_policy, sft_checkpoint_path, sft_key, train_sft
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule


def test_sft_fits_conditional_gaussian():
    # a | c ~ N(mean = [2c, -1], std = [0.3, 0.1]) for every token of a 3-token chunk; c ~ U(-1, 1)
    g = torch.Generator().manual_seed(0)
    M, H = 4096, 3
    c = torch.rand(M, 1, generator=g) * 2 - 1
    mean = torch.cat([2 * c, -torch.ones(M, 1)], 1)
    std = torch.tensor([0.3, 0.1])
    actions = mean[:, None, :] + std * torch.randn(M, H, 2, generator=g)
    data = ChunkDataset(obs=c, actions=actions, is_pad=torch.zeros(M, H, dtype=torch.bool))
    cfg = PolicyConfig(horizon=H, n_action_steps=H, width=64, depth=2, heads=4, mlp_ratio=2.0, num_steps=8)
    policy = build_policy(data, cfg)
    # the flow-matching loss has a high floor (the conditional variance of eps - a), so it is no measure of fit;
    # the samples below are
    losses = train_sft(policy, data, SFTConfig(steps=1000, batch_size=256, lr=2e-3, seed=0), progress=False,
                       log_every=500)
    assert all(torch.isfinite(torch.tensor(losses)))

    # samples (Euler ODE from fresh noise) reproduce the conditional mean and spread
    test_c = torch.tensor([[-0.8], [0.0], [0.7]]).repeat_interleave(1000, 0)
    rec = policy.sample(test_c, flow_sde_schedule(cfg.num_steps, 0.0), stochastic=False,
                        generator=torch.Generator().manual_seed(1))
    a = policy.to_env_actions(rec.actions)  # [3000, H, 2]
    for k, cv in enumerate((-0.8, 0.0, 0.7)):
        blk = a[k * 1000:(k + 1) * 1000].reshape(-1, 2)
        m, s = blk.mean(0), blk.std(0)
        assert abs(float(m[0]) - 2 * cv) < 0.1, f"c={cv}: mean {m.tolist()}"
        assert abs(float(m[1]) + 1) < 0.05, f"c={cv}: mean {m.tolist()}"
        assert 0.18 < float(s[0]) < 0.45 and 0.04 < float(s[1]) < 0.2, f"c={cv}: std {s.tolist()}"


def test_chunks_from_episodes_pads_with_last_action():
    obs = torch.arange(4, dtype=torch.float32).view(4, 1).numpy()  # T+1 = 4 observations
    act = torch.tensor([[1.0], [2.0], [3.0]]).numpy()  # T = 3 actions
    ds = chunks_from_episodes([(obs, act)], horizon=2)
    assert ds.actions[:, :, 0].tolist() == [[1, 2], [2, 3], [3, 3]]
    assert ds.is_pad.tolist() == [[False, False], [False, False], [False, True]]
    assert ds.obs[:, 0].tolist() == [0, 1, 2]


def test_sft_key_and_file_name_unchanged_by_the_chunk_rename():
    """Cached SFT files are found by name and reused while meta["key"] equals sft_key: both keep the values they had
    before policy.chunk was renamed n_action_steps (computed on the commit before the rename)."""
    cfg = ExperimentConfig()
    assert sft_key(cfg) == {
        "task": "PickCube-v1", "control_mode": "pd_ee_delta_pos",
        "demos": {"num_demos": 100, "seed": 500000, "path": "demos"},
        "sft": {"num_demos": 65, "steps": 15000, "batch_size": 256, "lr": 0.0003, "weight_decay": 0.0001, "seed": 0},
        "policy": {"horizon": 8, "chunk": 5, "action_pad": 0, "width": 128, "depth": 3, "heads": 4, "mlp_ratio": 4.0,
                   "dropout": 0.0, "num_steps": 4}}
    assert str(sft_checkpoint_path(cfg)) == "data/sft/PickCube-v1_65demos_15000steps_s0.pt"
    assert str(demo_path(cfg)) == "data/demos"


def test_policy_file_written_before_the_rename_loads():
    cfg = PolicyConfig(horizon=4, n_action_steps=3, width=16, depth=1, heads=2)
    blob = StateFlowPolicy(3, 2, cfg).export()
    old = dict(blob["policy_cfg"])
    old["chunk"] = old.pop("n_action_steps")
    pol = StateFlowPolicy.from_export({**blob, "policy_cfg": old}, cfg)
    assert pol.n_action_steps == 3
