"""Flow-GRPO reference (fastnft/nft.py docstring G1-G4): the loss against the literal Gaussian density, its gradient,
the PPO clip, the on-policy REINFORCE identity, group advantages and the config keys."""

import pytest
import torch
from torch.distributions import Normal

from fastnft.config import ConfigError, load_config
from fastnft.loop.rollout import control_labels, grpo_advantages
from fastnft.nft import grpo_loss, grpo_terms
from fastnft.sde import flow_sde_schedule


def make_batch(N=9, C=3, D=4, seed=0, drift=0.02, dtype=torch.float64):
    """Rows of recorded S2 steps: x_next drawn from the rollout policy's transition, v_theta = v_old + drift."""
    g = torch.Generator().manual_seed(seed)
    sch = flow_sde_schedule(4, 0.3).to(dtype=dtype)
    i = torch.randint(0, 4, (N,), generator=g)
    A, B, std = sch.A[i], sch.B[i], sch.std[i]
    x_t = torch.randn(N, C, D, generator=g, dtype=dtype)
    v_old = torch.randn(N, C, D, generator=g, dtype=dtype)
    x_next = (A.view(-1, 1, 1) * x_t + B.view(-1, 1, 1) * v_old
              + std.view(-1, 1, 1) * torch.randn(N, C, D, generator=g, dtype=dtype))
    v_theta = (v_old + drift * torch.randn(N, C, D, generator=g, dtype=dtype)).requires_grad_(True)
    adv = torch.randn(N, generator=g, dtype=dtype)
    return {"v_theta": v_theta, "v_old": v_old, "x_t": x_t, "x_next": x_next, "A": A, "B": B, "std": std,
            "adv": adv}


def literal_log_ratio(b):
    """G2-G3 from the full Gaussian densities (normalising constants included), summed over C and D."""
    A, B, std = (b[k].view(-1, 1, 1) for k in ("A", "B", "std"))
    logp_theta = Normal(A * b["x_t"] + B * b["v_theta"], std).log_prob(b["x_next"]).sum((1, 2))
    logp_old = Normal(A * b["x_t"] + B * b["v_old"], std).log_prob(b["x_next"]).sum((1, 2))
    return logp_theta - logp_old


def literal_loss(b, clip_eps=0.2, kl_coef=0.0):
    rho = torch.exp(literal_log_ratio(b))
    adv = b["adv"]
    obj = torch.minimum(rho * adv, torch.clamp(rho, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = ((b["v_theta"] - b["v_old"]) ** 2).mean(-1).mean(-1)
    return -obj.mean() + kl_coef * kl.mean()


@pytest.mark.parametrize("clip_eps,kl_coef", [(0.2, 0.0), (0.1, 0.5)])
def test_loss_matches_literal_gaussian_formula(clip_eps, kl_coef):
    b = make_batch(drift=0.05)
    terms = grpo_terms(**b, clip_eps=clip_eps)
    want_lr = literal_log_ratio(b)
    assert torch.allclose(terms.log_ratio, want_lr, atol=1e-10), (terms.log_ratio, want_lr)
    assert torch.allclose(terms.ratio, torch.exp(want_lr), atol=1e-10)
    got = grpo_loss(**b, clip_eps=clip_eps, kl_coef=kl_coef)
    want = literal_loss(b, clip_eps, kl_coef)
    assert torch.allclose(got, want, atol=1e-12), (got, want)
    # the batch must exercise the clip on both sides, or the test would not check it
    assert bool(terms.clipped.any()) and bool((~terms.clipped).any())


def _away_from_clip(b, clip_eps, margin=0.02):
    ratio = grpo_terms(**b, clip_eps=clip_eps).ratio
    return bool(((ratio - (1 - clip_eps)).abs() > margin).all() and ((ratio - (1 + clip_eps)).abs() > margin).all())


def test_gradcheck_float64():
    b = make_batch(N=8, C=2, D=3, seed=7, drift=0.06)  # ratios 0.41..1.61: both clip sides, both signs of A
    assert _away_from_clip(b, 0.2), "pick a seed whose ratios stay away from the clip boundary"
    assert bool(grpo_terms(**b).clipped.any()), "the points should include clipped rows"
    vt = b.pop("v_theta").detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: grpo_loss(v, **b, kl_coef=0.3), (vt,), eps=1e-6, atol=1e-7)


def test_clipped_branch_has_zero_gradient():
    """rho > 1 + eps with A > 0 (and rho < 1 - eps with A < 0): the clipped constant is the minimum, no gradient.
    rho > 1 + eps with A < 0 stays on the unclipped side and keeps its gradient."""
    b = make_batch(N=64, seed=1, drift=0.05)
    terms = grpo_terms(**b)
    ratio, adv = terms.ratio.detach(), b["adv"]
    up_pos = (ratio > 1.2) & (adv > 0)
    down_neg = (ratio < 0.8) & (adv < 0)
    up_neg = (ratio > 1.2) & (adv < 0)
    assert up_pos.any() and down_neg.any() and up_neg.any(), "batch must cover the three cases"
    assert torch.equal(terms.clipped, up_pos | down_neg)
    (g,) = torch.autograd.grad(grpo_loss(**b, kl_coef=0.0), b["v_theta"])
    per_row = g.abs().flatten(1).sum(1)
    assert torch.count_nonzero(per_row[up_pos | down_neg]) == 0
    assert (per_row[up_neg] > 0).all()
    assert (per_row[~terms.clipped] > 0).all()


@pytest.mark.parametrize("masked", [False, True])
def test_on_policy_gradient_is_reinforce_score(masked):
    """At v_theta = v_old, rho = 1 and dL/dv_theta = -A B (x_next - mu_old) / std^2 / n_valid (REINFORCE)."""
    b = make_batch(N=10, seed=2)
    b["v_theta"] = b["v_old"].clone().requires_grad_(True)
    mask = torch.tensor([True, False] * 5) if masked else None
    terms = grpo_terms(**b)
    assert torch.equal(terms.ratio, torch.ones(10, dtype=torch.float64))
    (g,) = torch.autograd.grad(grpo_loss(**b, mask=mask, kl_coef=0.7), b["v_theta"])  # KL grad is 0 at dv = 0
    A, B, std = (b[k].view(-1, 1, 1) for k in ("A", "B", "std"))
    r = b["x_next"] - (A * b["x_t"] + B * b["v_old"])
    m = torch.ones(10, dtype=torch.float64) if mask is None else mask.double()
    want = -(b["adv"] * m).view(-1, 1, 1) * B * r / std**2 / m.sum()
    assert torch.allclose(g, want, atol=1e-12)


def test_mask_partial_and_all_false():
    b = make_batch(N=6)
    mask = torch.tensor([True, False, True, True, False, True])
    sub = {k: v[mask] for k, v in b.items()}
    assert torch.allclose(grpo_loss(**b, mask=mask, kl_coef=0.1), grpo_loss(**sub, kl_coef=0.1), atol=1e-12)
    zero = grpo_loss(**b, mask=torch.zeros(6, dtype=torch.bool))
    assert float(zero.detach()) == 0.0
    (g,) = torch.autograd.grad(zero, b["v_theta"])
    assert torch.count_nonzero(g) == 0


def test_float32_log_ratio_has_no_cancellation():
    """Small drifts: the float32 log-ratio (residual form G3) must match float64 arithmetic on the same (float32)
    inputs to ~1e-5 relative, where the literal difference of two squared norms loses ~1e-2."""
    b32 = {k: v.detach().float() for k, v in make_batch(N=16, C=5, D=32, drift=1e-4).items()}
    ref = grpo_terms(**{k: v.double() for k, v in b32.items()}).log_ratio
    lr32 = grpo_terms(**b32).log_ratio
    assert lr32.dtype == torch.float32 and grpo_loss(**b32).dtype == torch.float32
    rel = ((lr32.double() - ref).abs() / ref.abs()).max()
    A, B, std = (b32[k].view(-1, 1, 1) for k in ("A", "B", "std"))
    mu_t, mu_o = A * b32["x_t"] + B * b32["v_theta"], A * b32["x_t"] + B * b32["v_old"]
    sq = ((b32["x_next"] - mu_t) ** 2).sum((1, 2)) - ((b32["x_next"] - mu_o) ** 2).sum((1, 2))
    naive = -sq / (2 * std.view(-1) ** 2)
    rel_naive = ((naive.double() - ref).abs() / ref.abs()).max()
    assert rel < 1e-4 and rel_naive > 10 * rel, (rel, rel_naive)


def test_log_ratio_clamp_keeps_float32_finite():
    b = {k: v.detach().float() for k, v in make_batch(N=4, drift=50.0).items()}
    b["adv"] = -b["adv"].abs()
    assert (grpo_terms(**b, log_ratio_clamp=None).log_ratio.abs() > 100).any()
    assert torch.isfinite(grpo_loss(**b))


def test_errors_name_the_problem():
    b = make_batch(N=3)
    with pytest.raises(ValueError, match="adv must be a per-sample"):
        grpo_loss(**dict(b, adv=b["adv"][:2]))
    with pytest.raises(ValueError, match="x_next"):
        grpo_loss(**dict(b, x_next=b["x_next"][:, :1]))
    with pytest.raises(ValueError, match="noise_level > 0"):
        grpo_loss(**dict(b, std=torch.zeros(3, dtype=torch.float64)))
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(**b, clip_eps=1.0)


# --- G1: group-relative advantages ---------------------------------------------------------------------------------

def test_grpo_advantages_literal_and_unanimous_groups():
    s = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    eps = 1e-4
    adv = grpo_advantages(s, 4, eps)
    want = []
    for grp in s.float().view(-1, 4).tolist():
        mean = sum(grp) / 4
        std = (sum((x - mean) ** 2 for x in grp) / 4) ** 0.5  # population std
        want += [(x - mean) / (std + eps) for x in grp]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)
    assert torch.equal(adv[4:12], torch.zeros(8)), "unanimous groups must give A = 0 exactly"
    assert float(adv.abs().max()) <= 3 ** 0.5 + 1e-6  # Samuelson: |A| <= sqrt(G - 1)
    assert adv.dtype == torch.float32


def test_grpo_advantages_errors():
    s = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(s, 4)
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo_advantages(s, 1)


def test_label_controls_apply_to_advantages():
    adv = grpo_advantages(torch.tensor([1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool), 4)
    g = torch.Generator().manual_seed(0)
    sh = control_labels(adv, "shuffled", g)
    assert torch.equal(sh.sort().values, adv.sort().values) and not torch.equal(sh, adv)
    assert torch.equal(control_labels(adv, "zero", g), torch.zeros(8))


# --- config ----------------------------------------------------------------------------------------------------------

def test_config_grpo_keys_and_defaults():
    cfg = load_config("configs/bandit_stepnft.yaml")
    assert cfg.algo == "stepnft" and cfg.grpo.clip_eps == 0.2 and cfg.grpo.kl_coef == 0.0
    cfg = load_config("configs/bandit_stepnft.yaml", ["algo=grpo", "train.group_size=8", "grpo.clip_eps=0.1",
                                                      "grpo.adv_eps=1e-6", "grpo.log_ratio_clamp=null"])
    assert (cfg.algo, cfg.grpo.clip_eps, cfg.grpo.adv_eps, cfg.grpo.log_ratio_clamp) == ("grpo", 0.1, 1e-6, None)
    # the shipped PickCube config already has groups of 8, so --set algo=grpo alone is enough there
    assert load_config("configs/pickcube_stepnft.yaml", ["algo=grpo"]).algo == "grpo"


@pytest.mark.parametrize("override,needle", [
    (["algo=ppo"], "config key 'algo': expected one of 'stepnft', 'grpo'"),
    (["algo=grpo"], "config key 'train.group_size': algo 'grpo' needs train.group_size > 1"),
    (["algo=grpo", "train.group_size=8", "nft.rollout=ode"], "config key 'nft.rollout'"),
    (["algo=grpo", "train.group_size=8", "nft.noise_level=0"], "config key 'nft.noise_level'"),
    (["algo=grpo", "train.group_size=8", "nft.target=x0"], "config key 'nft.target'"),
    (["grpo.clip_eps=0"], "config key 'grpo.clip_eps': must be in (0, 1)"),
    (["grpo.clip_eps=1.5"], "grpo.clip_eps"),
    (["grpo.adv_eps=0"], "grpo.adv_eps"),
    (["grpo.kl_coef=-1"], "grpo.kl_coef"),
    (["grpo.log_ratio_clamp=0"], "grpo.log_ratio_clamp"),
    (["grpo.clip=0.2"], "did you mean 'grpo.clip_eps'"),
])
def test_config_grpo_validation(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/bandit_stepnft.yaml", override)
    assert needle in str(e.value), str(e.value)


# --- rollout labels and the update path ----------------------------------------------------------------------------

def _bandit_buffer(algo="grpo", label_control="none", G=4, seed=0):
    from fastnft.config import NFTConfig, PolicyConfig
    from fastnft.envs.bandit import BanditEnv
    from fastnft.loop.rollout import run_episodes
    from fastnft.policies.state_flow import StateFlowPolicy

    torch.manual_seed(0)
    policy = StateFlowPolicy(4, 2, PolicyConfig(horizon=4, n_action_steps=4, width=16, depth=1, heads=2, num_steps=4))
    env = BanditEnv(16, chunk=4, radius=0.5)  # ~60 % success: both mixed and unanimous groups
    sch = flow_sde_schedule(4, 0.5)
    seeds = [100 + j // G for j in range(32)]  # G adjacent rollouts per initial state, as StepNFTTrainer.train_seeds
    buf, st = run_episodes(policy, env, sch, seeds, stochastic=True, record=True,
                           generator=torch.Generator().manual_seed(seed), nft=NFTConfig(noise_level=0.5),
                           group_size=G, label_control=label_control, algo=algo, adv_eps=1e-4)
    return policy, buf, st, sch


def test_run_episodes_grpo_labels_are_group_advantages():
    _, buf, st, _ = _bandit_buffer()
    adv = grpo_advantages(st.episode_success, 4, 1e-4)
    assert torch.equal(buf.y, adv[buf.episode])
    assert (adv != 0).any() and (adv == 0).any(), "need both mixed and unanimous groups for this check"
    _, buf_s, st_s, _ = _bandit_buffer(label_control="shuffled")
    assert torch.equal(st_s.episode_success, st.episode_success)  # the same episodes, only the labels move
    ep_y = torch.zeros(32).scatter_(0, buf_s.episode, buf_s.y)
    assert torch.equal(ep_y.sort().values, adv.sort().values) and not torch.equal(ep_y, adv)
    with pytest.raises(ValueError, match="algo must be"):
        _bandit_buffer(algo="ppo")


def test_update_path_dispatches_on_algo():
    """buffer_loss with a grpo config equals grpo_loss on the same rows; the diagnostics report ratio statistics
    (ratio 1 and no clipping when actor == rollout policy) and the gradient-signal diagnostic runs."""
    from fastnft.config import GRPOConfig, NFTConfig
    from fastnft.loop.update import buffer_loss, gradient_signal, loss_diagnostics

    policy, buf, _, sch = _bandit_buffer()
    sch = sch.to(dtype=torch.float32)
    nft, grpo = NFTConfig(noise_level=0.5), GRPOConfig(kl_coef=0.01)
    got = buffer_loss(policy, buf, sch, nft, 4, grpo_loss, grpo)
    i = buf.step
    v = policy(buf.x_t, sch.t[i], buf.obs)
    want = grpo_loss(v, buf.v_old, buf.x_t, buf.x_next, sch.A[i], sch.B[i], sch.std[i], buf.y, kl_coef=0.01)
    assert torch.allclose(got, want)
    d = loss_diagnostics(policy, buf, sch, nft, 4, prefix="fresh/", grpo=grpo)
    assert abs(d["fresh/ratio_mean"] - 1) < 1e-3 and d["fresh/clip_frac"] == 0.0
    assert {"fresh/loss", "fresh/ratio_std", "fresh/log_ratio_abs", "fresh/ratio_out", "fresh/drift"} <= set(d)
    sig = gradient_signal(policy, buf, sch, nft, 4, grpo_loss, torch.Generator().manual_seed(0), grpo=grpo)
    assert set(sig) == {"signal/cos_halves", "signal/label_share", "signal/grad_norm"}
    assert sig["signal/grad_norm"] > 0
