"""SPEC S3-S4 bookkeeping of rollouts: stored calls, masking after the episode ended, labels and baselines."""

import pytest
import torch

from fastnft.config import NFTConfig, PolicyConfig
from fastnft.envs.base import VectorEnv
from fastnft.loop.rollout import episode_labels, run_episodes
from fastnft.policies.state_flow import StateFlowPolicy
from fastnft.report import wilson_interval
from fastnft.sde import flow_sde_schedule


class ScriptedEnv(VectorEnv):
    """Env j succeeds at its ``succeed_at[seed]``-th step (1-based) or never (0); obs = [seed, step]."""

    def __init__(self, num_envs, succeed_at, max_steps=12):
        super().__init__()
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = num_envs, 2, 2, max_steps
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self.succeed_at = succeed_at
        self.steps_taken = torch.zeros(num_envs, dtype=torch.long)

    def _reset(self, seeds):
        self.seeds = torch.tensor(seeds)
        self.t = torch.zeros(self.num_envs, dtype=torch.long)
        return torch.stack([self.seeds.float(), self.t.float()], 1)

    def _step(self, actions):
        self.t += 1
        self.steps_taken += (~self.done).long()
        goal = torch.tensor([self.succeed_at.get(int(s), 0) for s in self.seeds])
        success = (goal > 0) & (self.t == goal)
        return torch.stack([self.seeds.float(), self.t.float()], 1), success.float(), success


def _policy():
    torch.manual_seed(0)
    return StateFlowPolicy(2, 2, PolicyConfig(horizon=6, n_action_steps=4, width=16, depth=1, heads=2, num_steps=4))


def test_calls_after_episode_end_are_not_stored_and_labels_follow_success():
    # seeds 0..3: success at step 3 (1 call), 6 (2 calls), never (3 calls of a 12-step episode), 9 (3 calls)
    env = ScriptedEnv(4, {0: 3, 1: 6, 3: 9})
    buf, st = run_episodes(_policy(), env, flow_sde_schedule(4, 0.2), [0, 1, 2, 3], stochastic=True, record=True,
                           generator=torch.Generator().manual_seed(0), nft=NFTConfig())
    per_ep = torch.bincount(buf.episode, minlength=4).tolist()
    assert per_ep == [1, 2, 3, 3], per_ep
    assert st.episode_success.tolist() == [True, True, False, True]
    assert st.episode_steps.tolist() == [3, 6, 12, 9]
    assert env.steps_taken.tolist() == [3, 6, 12, 9], "ended envs must not be stepped as active"
    want = {0: 1.0, 1: 1.0, 2: -1.0, 3: 1.0}
    assert all(float(y) == want[int(e)] for y, e in zip(buf.y, buf.episode))
    # the stored context is the observation of that call: step counters 0, 4, 8 of the episode
    assert sorted(buf.obs[buf.episode == 2][:, 1].tolist()) == [0.0, 4.0, 8.0]


def test_several_solver_steps_per_call_are_distinct():
    env = ScriptedEnv(2, {}, max_steps=4)
    nft = NFTConfig(steps_per_call=3)
    buf, _ = run_episodes(_policy(), env, flow_sde_schedule(4, 0.2), [5, 6], stochastic=True, record=True,
                          generator=torch.Generator().manual_seed(1), nft=nft)
    assert len(buf) == 2 * 3
    for e in (0, 1):
        steps = buf.step[buf.episode == e].tolist()
        assert len(set(steps)) == 3, steps


def test_fixed_step_and_uneven_last_round():
    env = ScriptedEnv(4, {}, max_steps=4)
    buf, st = run_episodes(_policy(), env, flow_sde_schedule(4, 0.2), [1, 2, 3, 4, 5, 6], stochastic=True,
                           record=True, generator=torch.Generator().manual_seed(2), nft=NFTConfig(step="fixed:2"))
    assert st.episodes == 6 and len(buf) == 6 and set(buf.step.tolist()) == {2}


def test_episode_labels_baselines():
    s = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    assert episode_labels(s).tolist() == [1, -1, -1, -1, 1, 1, 1, 1]
    assert torch.allclose(episode_labels(s, "batch"), s.float() - 0.625)
    g = episode_labels(s, "group", 4)
    assert torch.allclose(g, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    assert float(g.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="groups of 3"):
        episode_labels(s, "group", 3)
    with pytest.raises(ValueError, match="baseline must be"):
        episode_labels(s, "mean")


def test_wilson_interval_brackets_rate():
    lo, hi = wilson_interval(74, 200)
    assert lo < 0.37 < hi and 0.30 < lo and hi < 0.44
    assert wilson_interval(0, 10)[0] == 0.0


def test_control_labels_shuffle_keeps_distribution_and_zero_clears():
    """Issue 6 controls: shuffled labels are a permutation of the real ones (same distribution, new order); zero
    labels are all 0; none returns the labels untouched; an unknown mode is refused."""
    from fastnft.loop.rollout import control_labels

    y = torch.tensor([1.0, -1.0, 0.5, -0.25, 0.0, 0.75, -0.5, 1.0])
    g = torch.Generator().manual_seed(3)
    s = control_labels(y, "shuffled", g)
    assert torch.equal(s.sort().values, y.sort().values)
    assert not torch.equal(s, y)
    assert torch.equal(control_labels(y, "zero", g), torch.zeros_like(y))
    assert control_labels(y, "none", g) is y
    with pytest.raises(ValueError, match="label control"):
        control_labels(y, "flip", g)


def test_dense_episode_score_orders_outcomes():
    """S4 soft score: success beats any failure, earlier success beats later, a failure that got further beats one
    that did not; all in [0, 1]."""
    from fastnft.loop.rollout import dense_episode_score

    ret = torch.tensor([20.0, 40.0, 30.0, 10.0])
    steps = torch.tensor([30, 60, 100, 100])
    succ = torch.tensor([True, True, False, False])
    r = dense_episode_score(ret, steps, succ, 100)
    assert torch.allclose(r, torch.tensor([0.9, 0.8, 0.3, 0.1]))
    assert r[1] > r[2] > r[3] and r[0] > r[1]
    assert float(dense_episode_score(torch.tensor([500.0]), torch.tensor([100]), torch.tensor([False]), 100)) == 1.0


def _signal_buffer(n_ep, informative, seed=0):
    from fastnft.loop.rollout import RolloutBuffer

    g = torch.Generator().manual_seed(seed)
    sch = flow_sde_schedule(4, 0.2).to(dtype=torch.float32)
    H, D, rows_per_ep = 2, 3, 4
    M = n_ep * rows_per_ep
    step = torch.randint(0, 4, (M,), generator=g)
    x_t = torch.randn(M, H, D, generator=g)
    v_old = torch.zeros(M, H, D)
    z = torch.randn(M, H, D, generator=g)
    x_next = sch.A[step].view(-1, 1, 1) * x_t + sch.std[step].view(-1, 1, 1) * z
    episode = torch.arange(n_ep).repeat_interleave(rows_per_ep)
    u = torch.zeros(H, D)
    u[0, 0] = 1.0
    if informative:  # success iff the injected noise pointed along u: labels carry a gradient direction
        y_ep = torch.sign(torch.zeros(n_ep).index_add_(0, episode, (z * u).sum((1, 2))))
    else:
        y_ep = torch.where(torch.rand(n_ep, generator=g) < 0.5, -1.0, 1.0)
    obs = 1.0 + torch.randn(M, 16, generator=g)
    buf = RolloutBuffer(obs=obs, x_t=x_t, v_old=v_old, x_next=x_next, x0=x_next, step=step,
                        y=y_ep[episode], episode=episode)
    return buf, sch


class _Linear(torch.nn.Module):
    """v = W obs + b, zero at start (v_theta = v_old = 0); 102 parameters, so random halves are near-orthogonal."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 6)
        torch.nn.init.zeros_(self.lin.weight)
        torch.nn.init.zeros_(self.lin.bias)

    def forward(self, x_t, t, obs):
        return self.lin(obs).view(-1, 2, 3) + 0 * x_t


def test_gradient_signal_separates_informative_from_random_labels():
    """Issue 6 diagnostics: labels that depend on the injected noise give halves that agree and a gradient the
    labels explain; labels independent of the noise give neither."""
    from fastnft.loop.update import gradient_signal
    from fastnft.nft import stepnft_loss

    nft = NFTConfig(max_drift=None)
    good, bad = [], []
    for seed in range(3):
        buf, sch = _signal_buffer(400, True, seed)
        good.append(gradient_signal(_Linear(), buf, sch, nft, 2, stepnft_loss, torch.Generator().manual_seed(seed)))
        buf, sch = _signal_buffer(400, False, seed)
        bad.append(gradient_signal(_Linear(), buf, sch, nft, 2, stepnft_loss, torch.Generator().manual_seed(seed)))
    assert min(r["signal/cos_halves"] for r in good) > 0.5
    assert min(r["signal/label_share"] for r in good) > 0.5
    assert sum(r["signal/cos_halves"] for r in bad) / 3 < 0.4
    assert sum(r["signal/label_share"] for r in bad) / 3 < 0.4
