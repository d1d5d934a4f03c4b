"""CUDA-graph rollouts (issue 7, part 5): eager fallback on CPU here, graph checks on a GPU (skipped without one)."""

import pytest
import torch

from fastnft.config import PolicyConfig
from fastnft.loop.graphs import GraphedSampler, graphs_enabled
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule


def _policy():
    torch.manual_seed(0)
    return StateFlowPolicy(5, 3, PolicyConfig(horizon=6, n_action_steps=4, width=32, depth=1, heads=2, num_steps=4)).eval()


def test_mode_resolution():
    assert graphs_enabled("auto", "cuda:0") and not graphs_enabled("auto", "cpu")
    assert not graphs_enabled("off", "cuda:0") and graphs_enabled("on", "cuda:0")
    with pytest.raises(RuntimeError, match="rollout.cuda_graphs"):
        graphs_enabled("on", "cpu")
    with pytest.raises(ValueError):
        graphs_enabled("maybe", "cpu")


def test_cpu_runs_the_same_code_eagerly():
    """On CPU (auto) the sampler is policy.sample itself: same generator state, same draws and outputs."""
    pol = _policy()
    gs = GraphedSampler(pol, "auto")
    assert not gs.enabled
    obs, sch = torch.randn(9, 5), flow_sde_schedule(4, 0.2)
    idx = torch.randint(0, 4, (9,))
    a = gs.sample(obs, sch, stochastic=True, generator=torch.Generator().manual_seed(3), step_index=idx)
    b = pol.sample(obs, sch, stochastic=True, generator=torch.Generator().manual_seed(3), step_index=idx)
    for k in ("actions", "x_t", "v_old", "x_next"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert gs.captures == 0


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_graph_replay_equals_eager_draws_new_noise_and_never_syncs():
    from fastnft.doctor.checks import cuda_graph

    cuda_graph()  # raises with the reason on any mismatch


@pytest.mark.gpu
@gpu
def test_new_shape_recaptures_and_old_shape_replays():
    from fastnft.devices import make_generator

    dev = torch.device("cuda", 0)
    pol = _policy().to(dev)
    gs = GraphedSampler(pol, "on")
    gen, sch = make_generator(dev, 0), flow_sde_schedule(4, 0.2)
    for n in (8, 16, 8):
        out = gs.sample(torch.randn(n, 5, device=dev), sch, stochastic=True, generator=gen)
        assert out.actions.shape == (n, 6, 3) and out.actions.device == dev
    assert gs.captures == 2


@pytest.mark.gpu
@gpu
def test_graphed_rollout_keeps_the_buffer_on_the_device():
    from fastnft.config import NFTConfig
    from fastnft.devices import make_generator
    from fastnft.envs.bandit import BanditEnv
    from fastnft.loop.rollout import run_episodes

    dev = torch.device("cuda", 0)
    pol = _policy().to(dev)
    env = BanditEnv(num_envs=16, chunk=4, obs_dim=5, act_dim=3)
    gs = GraphedSampler(pol, "on")
    buf, st = run_episodes(pol, env, flow_sde_schedule(4, 0.2), list(range(32)), stochastic=True, record=True,
                           generator=make_generator(dev, 0), nft=NFTConfig(), device=dev, sampler=gs)
    assert st.episodes == 32 and gs.captures == 1
    assert all(getattr(buf, k).device == dev for k in ("obs", "x_t", "v_old", "x_next", "step", "y"))
