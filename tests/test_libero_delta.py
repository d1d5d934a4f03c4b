"""RLinf's delta output transform (``env.delta_actions``): the state the policy saw is added to the first 6 action
dims of every step of the chunk, the gripper is untouched; off by default. No simulator: a stub LIBERO env."""

from __future__ import annotations

import torch

from fastnft.envs.base import VectorEnv
from fastnft.envs.libero import LiberoVectorEnv


class StubLibero(LiberoVectorEnv):
    """LiberoVectorEnv's chunk logic over a fake simulator whose state moves by 0.01 per step."""

    def __init__(self, delta: bool) -> None:
        VectorEnv.__init__(self)
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = 2, 8, 7, 50
        self.action_low, self.action_high = -torch.ones(7), torch.ones(7)
        self.delta_actions, self.rgb, self.got = delta, False, []
        self.state = torch.tensor([[0.1] * 8, [-0.2] * 8])

    def _reset(self, seeds):
        return self.state.clone()

    def _step(self, actions):
        self.got.append(actions.clone())
        self.state = self.state + 0.01
        return self.state.clone(), torch.zeros(2), torch.zeros(2, dtype=torch.bool)


def test_delta_actions_add_the_chunk_start_state():
    env = StubLibero(delta=True)
    env.reset([0, 1])
    chunk = torch.zeros(2, 3, 7)
    chunk[:, :, 6] = 0.5
    env.step_chunk(chunk)
    got = torch.stack(env.got, 1)  # [2, 3, 7]
    want = torch.tensor([0.1, -0.2]).view(2, 1, 1).expand(2, 3, 6)
    assert torch.allclose(got[..., :6], want) and torch.all(got[..., 6] == 0.5)
    env.step_chunk(chunk)  # the next chunk uses the state after the first chunk's 3 steps
    assert torch.allclose(env.got[3][:, :6], torch.tensor([[0.13] * 6, [-0.17] * 6]))
    assert torch.equal(chunk, torch.zeros(2, 3, 7).index_fill_(2, torch.tensor([6]), 0.5))  # input untouched


def test_without_delta_actions_pass_through():
    env = StubLibero(delta=False)
    env.reset([0, 1])
    chunk = torch.full((2, 2, 7), 0.25)
    env.step_chunk(chunk)
    assert all(torch.equal(a, torch.full((2, 7), 0.25)) for a in env.got)
