"""SPEC S5-S8: the reference StepNFT loss (fastnft.nft), checked against hand-written formulas."""

import pytest
import torch
import torch.nn.functional as F

from fastnft.nft import VAR_EPS, stepnft_loss, stepnft_terms
from fastnft.sde import flow_sde_schedule


def make_batch(N=7, C=5, D=3, seed=0, dtype=torch.float64, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    sch = flow_sde_schedule(4, 0.2).to(dtype=dtype)
    i = torch.randint(0, 4, (N,), generator=g)
    x_t = torch.randn(N, C, D, generator=g, dtype=dtype)
    v_old = torch.randn(N, C, D, generator=g, dtype=dtype)
    A, B, std = sch.A[i], sch.B[i], sch.std[i]
    x_next = A.view(-1, 1, 1) * x_t + B.view(-1, 1, 1) * v_old + std.view(-1, 1, 1) * torch.randn(
        N, C, D, generator=g, dtype=dtype)
    v_theta = (v_old + drift * torch.randn(N, C, D, generator=g, dtype=dtype)).requires_grad_(True)
    y = torch.where(torch.rand(N, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    return {"v_theta": v_theta, "v_old": v_old, "x_t": x_t, "x_next": x_next, "A": A, "B": B, "std": std, "y": y}, sch.t[i]


def manual_terms(b, beta=1.0, max_drift=0.5):
    """S5-S6 written out literally (branch means, then squared errors)."""
    dv = b["v_theta"] - b["v_old"]
    if max_drift is not None:
        dv = dv * torch.clamp(max_drift / (dv.norm(dim=-1, keepdim=True) + 1e-8), max=1.0)
    A, B = b["A"].view(-1, 1, 1), b["B"].view(-1, 1, 1)
    mu_p = A * b["x_t"] + B * (b["v_old"] + beta * dv)
    mu_n = A * b["x_t"] + B * (b["v_old"] - beta * dv)
    var = (b["std"] ** 2 + VAR_EPS).view(-1, 1)
    return ((b["x_next"] - mu_p) ** 2).sum(-1) / var, ((b["x_next"] - mu_n) ** 2).sum(-1) / var, dv


@pytest.mark.parametrize("max_drift", [0.5, None])
@pytest.mark.parametrize("beta,gamma", [(1.0, 1.0), (0.5, 2.0)])
def test_loss_matches_literal_formula(max_drift, beta, gamma):
    b, _ = make_batch()
    e_p, e_n, _ = manual_terms(b, beta, max_drift)
    L_tok = F.softplus(0.5 * gamma * b["y"].view(-1, 1) * (e_p - e_n))
    kl = ((b["v_theta"] - b["v_old"]) ** 2).mean(-1)
    want = L_tok.mean(-1).mean() + 1e-4 * kl.mean(-1).mean()
    got = stepnft_loss(**b, beta=beta, gamma=gamma, max_drift=max_drift)
    assert torch.allclose(got, want, atol=1e-12), (got, want)


def test_s7_identity_dot_product():
    # E+ - E- = -4 beta B <x_next - mu_old, dv_c> / var
    b, _ = make_batch(N=11, C=3, D=7, drift=2.0)
    beta = 0.7
    terms = stepnft_terms(**b, beta=beta, max_drift=0.5)
    _, _, dv_c = manual_terms(b, beta, 0.5)
    mu_old = b["A"].view(-1, 1, 1) * b["x_t"] + b["B"].view(-1, 1, 1) * b["v_old"]
    var = (b["std"] ** 2 + VAR_EPS).view(-1, 1)
    rhs = -4 * beta * b["B"].view(-1, 1) * ((b["x_next"] - mu_old) * dv_c).sum(-1) / var
    assert torch.allclose(terms.e_pos - terms.e_neg, rhs, atol=1e-9)
    assert (terms.clip_scale < 1).any(), "drift 2.0 should activate the clip somewhere"


@pytest.mark.parametrize("max_drift", [0.5, None])
def test_gradient_matches_finite_differences(max_drift):
    b, _ = make_batch(N=4, C=2, D=3, drift=0.6)
    vt = b.pop("v_theta").detach().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: stepnft_loss(v, **b, max_drift=max_drift), (vt,), eps=1e-6,
                                    atol=1e-6)


def test_gradient_sign_pulls_positive_branch():
    # A small gradient step on a success (y = +1) must lower E+ - E- (the positive branch explains x_next better)
    b, _ = make_batch(N=1, C=1, D=4, seed=3)
    b["y"] = torch.ones(1, dtype=torch.float64)
    before = stepnft_terms(**b)
    loss = stepnft_loss(**b, kl_coef=0.0)
    (g,) = torch.autograd.grad(loss, b["v_theta"])
    b2 = dict(b, v_theta=(b["v_theta"] - 1e-3 * g).detach())
    after = stepnft_terms(**b2)
    assert float((after.e_pos - after.e_neg).sum()) < float((before.e_pos - before.e_neg).sum())


def test_mask_partial_and_all_false():
    b, _ = make_batch(N=6)
    mask = torch.tensor([True, False, True, True, False, True])
    full = stepnft_loss(**b, mask=mask)
    sub = {k: (v[mask] if torch.is_tensor(v) else v) for k, v in b.items()}
    sub["v_theta"] = b["v_theta"][mask]
    assert torch.allclose(full, stepnft_loss(**sub), atol=1e-12)
    zero = stepnft_loss(**b, mask=torch.zeros(6, dtype=torch.bool))
    assert float(zero) == 0.0
    (g,) = torch.autograd.grad(zero, b["v_theta"])
    assert torch.count_nonzero(g) == 0


def test_soft_labels_interpolate_logits():
    b, _ = make_batch(N=5)
    b["y"] = torch.tensor([0.0, 0.5, -0.25, 1.0, -1.0], dtype=torch.float64)
    terms = stepnft_terms(**b)
    e_p, e_n, _ = manual_terms(b)
    assert torch.allclose(terms.logit, 0.5 * b["y"].view(-1, 1) * (e_p - e_n))
    assert torch.allclose(terms.loss_tok[0], torch.full_like(terms.loss_tok[0], torch.log(torch.tensor(2.0))))


def test_wmse_variant():
    b, _ = make_batch(N=6)
    r = (b["y"] + 1) / 2
    e_p, e_n, _ = manual_terms(b)
    want = (r.view(-1, 1) * e_p + (1 - r.view(-1, 1)) * e_n).mean(-1).mean()
    got = stepnft_loss(**b, loss="wmse", kl_coef=0.0)
    assert torch.allclose(got, want)


def test_single_branch_logits_add_up_to_full():
    b, _ = make_batch(N=8)
    full = stepnft_terms(**b)
    var = (b["std"] ** 2 + VAR_EPS).view(-1, 1)
    mu_old = b["A"].view(-1, 1, 1) * b["x_t"] + b["B"].view(-1, 1, 1) * b["v_old"]
    e0 = ((b["x_next"] - mu_old) ** 2).sum(-1) / var
    pos = stepnft_terms(**b, branches="positive")
    neg = stepnft_terms(**b, branches="negative")
    y = b["y"].view(-1, 1)
    assert torch.allclose(pos.loss_tok, F.softplus(0.5 * y * (full.e_pos - e0)))
    assert torch.allclose(neg.loss_tok, F.softplus(0.5 * y * (e0 - full.e_neg)))
    assert not torch.allclose(pos.loss_tok, full.loss_tok)


def test_x0_target_variant():
    b, t = make_batch(N=5)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(b["x_t"].shape, generator=g, dtype=torch.float64)
    dv = b["v_theta"] - b["v_old"]
    dv_c = dv * torch.clamp(0.5 / (dv.norm(dim=-1, keepdim=True) + 1e-8), max=1.0)
    tt = t.view(-1, 1, 1)
    x0p = b["x_t"] - tt * (b["v_old"] + dv_c)
    x0n = b["x_t"] - tt * (b["v_old"] - dv_c)
    var = (b["std"] ** 2 + VAR_EPS).view(-1, 1)
    e_p, e_n = ((x0p - x0) ** 2).sum(-1) / var, ((x0n - x0) ** 2).sum(-1) / var
    want = F.softplus(0.5 * b["y"].view(-1, 1) * (e_p - e_n)).mean(-1).mean()
    got = stepnft_loss(**b, target="x0", t=t, x0=x0, kl_coef=0.0)
    assert torch.allclose(got, want)
    with pytest.raises(ValueError, match="target='x0' needs"):
        stepnft_loss(**b, target="x0")


def test_kl_term_weight():
    b, _ = make_batch(N=3)
    diff = stepnft_loss(**b, kl_coef=0.5) - stepnft_loss(**b, kl_coef=0.0)
    kl = ((b["v_theta"] - b["v_old"]) ** 2).mean(-1).mean()
    assert torch.allclose(diff, 0.5 * kl)


def test_shape_errors_name_the_argument():
    b, _ = make_batch(N=3)
    with pytest.raises(ValueError, match="x_next"):
        stepnft_loss(**dict(b, x_next=b["x_next"][:, :2]))
    with pytest.raises(ValueError, match="per-sample"):
        stepnft_loss(**dict(b, y=b["y"][:2]))
    with pytest.raises(ValueError, match="mask"):
        stepnft_loss(**b, mask=torch.ones(3))
    with pytest.raises(ValueError, match="loss must be"):
        stepnft_loss(**b, loss="mse")
