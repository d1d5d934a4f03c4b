"""The state policy's normalisation is a processor step outside the network (issue 8, part 0), like lerobot's:
the network's state_dict holds weights only, the statistics move with the policy, and old policy files (statistics
among the weights) still load with the same outputs."""

from __future__ import annotations

import copy

import torch

from fastnft.config import PolicyConfig
from fastnft.policies.normalizer import Normalizer
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.sde import flow_sde_schedule


def _policy() -> StateFlowPolicy:
    torch.manual_seed(0)
    obs_norm = Normalizer(torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 0.5, 4.0]))
    act_norm = Normalizer(torch.tensor([0.1, -0.2]), torch.tensor([0.3, 0.6]))
    return StateFlowPolicy(3, 2, PolicyConfig(horizon=4, n_action_steps=2, width=16, depth=1, heads=2), obs_norm,
                           act_norm)


def _sample(pol: StateFlowPolicy, obs: torch.Tensor) -> torch.Tensor:
    rec = pol.sample(obs, flow_sde_schedule(4, 0.2), stochastic=True, generator=torch.Generator().manual_seed(3))
    return pol.to_env_actions(rec.actions)


def test_statistics_are_outside_the_network_and_round_trip(tmp_path):
    pol = _policy()
    assert not any("norm" in k and k.startswith(("obs_", "act_")) for k in pol.state_dict())
    assert all(p.requires_grad for p in pol.trainable_parameters())
    assert len(pol.trainable_parameters()) == len(list(pol.parameters()))
    obs = torch.randn(5, 3) * 3
    # the processor does the normalisation: raw obs at the mean give the same state token as zeros through the net
    z = pol.processor.normalize_obs(obs)
    torch.testing.assert_close(z, (obs - torch.tensor([1.0, -2.0, 3.0])) / torch.tensor([2.0, 0.5, 4.0]))
    want = _sample(pol, obs)
    back = StateFlowPolicy.load(pol.save(tmp_path / "p.pt"))
    assert torch.equal(_sample(back, obs), want)
    twin = copy.deepcopy(pol)  # the EMA copy carries its own statistics
    assert torch.equal(_sample(twin, obs), want)


def test_statistics_move_with_the_policy():
    pol = _policy().to(torch.float64)
    assert pol.processor.obs_norm.mean.dtype == torch.float64 and pol.processor.act_norm.std.dtype == torch.float64
    assert pol.processor.obs_norm.mean.device == next(pol.parameters()).device


def test_policy_file_written_before_the_split_loads_with_the_same_outputs():
    pol = _policy()
    old = pol.export()
    old["state_dict"] = {**old["state_dict"], **old.pop("processor")}  # the former layout: buffers among weights
    obs = torch.randn(4, 3)
    assert torch.equal(_sample(StateFlowPolicy.from_export(old), obs), _sample(pol, obs))
