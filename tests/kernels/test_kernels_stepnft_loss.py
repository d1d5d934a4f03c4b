"""Fused StepNFT loss vs the reference ``fastnft.nft.stepnft_loss`` (SPEC S5-S8), Triton interpreter on CPU.

Value and gradient w.r.t. ``v_theta`` are compared with autograd through the reference in float64 (so the clip
factor's gradient, S5, is checked), on odd shapes, masks, clip regimes, soft labels and every S8 variant.
"""

from __future__ import annotations

import pytest
import torch
from _kernel_compare import assert_close

from fastnft.kernels.stepnft_loss import INTERPRETED, stepnft_loss_forward
from fastnft.kernels.stepnft_loss import stepnft_loss as fused_loss
from fastnft.nft import stepnft_loss as ref_loss
from fastnft.nft import stepnft_terms
from fastnft.sde import flow_sde_schedule

# float64: the kernel's algebra (S7 identity) and the reference's differ only by rounding; the reference forms
# E+ - E- as a difference of two O(D / var) numbers, hence the small absolute slack relative to the largest
# value.
RTOL64, ATOL64 = 1e-7, 1e-9


def make_batch(N: int, C: int, D: int, *, dtype=torch.float64, drift=(0.05, 3.0), labels="soft", seed=0):
    """A realistic StepNFT batch: x_next drawn from the rollout's own Flow-SDE transition (S2), per-token
    drift norms ``||v_theta - v_old||`` uniform in ``drift`` (so the clip at 0.5 is on, off or mixed)."""
    g = torch.Generator().manual_seed(seed)
    sch = flow_sde_schedule(4, 0.2)
    i = torch.randint(0, 4, (N,), generator=g)
    A, B, std, t = sch.A[i], sch.B[i], sch.std[i], sch.t[i]
    x_t = torch.randn(N, C, D, generator=g, dtype=torch.float64)
    v_old = torch.randn(N, C, D, generator=g, dtype=torch.float64)
    x_next = A.view(-1, 1, 1) * x_t + B.view(-1, 1, 1) * v_old + std.view(-1, 1, 1) * torch.randn(
        N, C, D, generator=g, dtype=torch.float64)
    direction = torch.randn(N, C, D, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    lo, hi = drift
    norms = lo + (hi - lo) * torch.rand(N, C, 1, generator=g, dtype=torch.float64)
    v_theta = v_old + direction * norms
    if labels == "soft":
        y = 2 * torch.rand(N, generator=g, dtype=torch.float64) - 1
    else:
        y = 2 * torch.randint(0, 2, (N,), generator=g).to(torch.float64) - 1
    x0 = torch.randn(N, C, D, generator=g, dtype=torch.float64)
    big = [u.to(dtype) for u in (v_theta, v_old, x_t, x_next, x0)]
    return {"v_theta": big[0], "v_old": big[1], "x_t": big[2], "x_next": big[3], "A": A, "B": B, "std": std,
            "y": y, "t": t, "x0": big[4]}


def make_mask(N: int, kind: str, seed: int = 1) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all_false":
        return torch.zeros(N, dtype=torch.bool)
    m = torch.rand(N, generator=torch.Generator().manual_seed(seed)) < 0.6
    m[0] = True  # at least one valid sample, also for N = 1
    if N > 1:
        m[-1] = False
    return m


def run_both(batch: dict, mask, *, ref_dtype=torch.float64, grad_out: float = 1.0, **kw):
    """(fused loss, fused grad, reference loss, reference grad); the reference runs in ``ref_dtype`` on the
    same (possibly bf16-rounded) inputs."""
    args = ("v_old", "x_t", "x_next", "A", "B", "std", "y")
    extra = {"t": batch["t"], "x0": batch["x0"]} if kw.get("target") == "x0" else {}
    v1 = batch["v_theta"].clone().requires_grad_(True)
    l1 = fused_loss(v1, *(batch[a] for a in args), mask, **kw, **extra)
    (grad_out * l1).backward()
    conv = {k: (v.to(ref_dtype) if torch.is_tensor(v) else v) for k, v in batch.items()}
    extra_r = {"t": conv["t"], "x0": conv["x0"]} if kw.get("target") == "x0" else {}
    v2 = conv["v_theta"].clone().requires_grad_(True)
    l2 = ref_loss(v2, *(conv[a] for a in args), mask, **kw, **extra_r)
    (grad_out * l2).backward()
    return l1, v1.grad, l2, v2.grad


def check64(l1, g1, l2, g2, what: str) -> None:
    scale = max(1.0, g2.abs().max().item())
    assert l1.dtype == torch.float64 and g1.dtype == torch.float64
    assert_close(l1, l2, rtol=RTOL64, atol=ATOL64, what=f"{what} loss")
    assert_close(g1, g2, rtol=RTOL64, atol=ATOL64 * scale, what=f"{what} grad")


def test_kernels_are_interpreted():
    assert INTERPRETED, "TRITON_INTERPRET=1 must be set before fastnft.kernels.stepnft_loss is imported"


@pytest.mark.parametrize("D", [3, 7, 32])
@pytest.mark.parametrize("C", [1, 5, 8])
@pytest.mark.parametrize("N", [1, 37, 1000])
@pytest.mark.parametrize("mask_kind", ["none", "partial"])
def test_value_and_grad_odd_shapes(N, C, D, mask_kind):
    batch = make_batch(N, C, D, seed=N * 100 + C * 10 + D)
    check64(*run_both(batch, make_mask(N, mask_kind)), what=f"N={N} C={C} D={D} mask={mask_kind}")


VARIANTS = [
    {"loss": "ranking", "branches": "positive"},
    {"loss": "ranking", "branches": "negative"},
    {"loss": "wmse"},
    {"loss": "wmse", "branches": "positive"},
    {"loss": "wmse", "branches": "negative"},
    {"target": "x0"},
    {"target": "x0", "loss": "wmse"},
    {"target": "x0", "branches": "negative"},
    {"max_drift": None},
    {"beta": 0.7, "gamma": 2.5, "kl_coef": 0.05, "max_drift": 0.3},
    {"kl_coef": 0.0},
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize(("N", "C", "D"), [(37, 5, 7), (1000, 8, 32)])
def test_variants_s8(kw, N, C, D):
    batch = make_batch(N, C, D, seed=7)
    check64(*run_both(batch, make_mask(N, "partial"), **kw), what=f"{kw} N={N} C={C} D={D}")


@pytest.mark.parametrize(("regime", "drift"), [("inactive", (0.01, 0.45)), ("active", (0.6, 4.0)),
                                               ("mixed", (0.2, 1.0))])
@pytest.mark.parametrize(("N", "C", "D"), [(37, 5, 7), (1000, 8, 32)])
def test_drift_clip_regimes(regime, drift, N, C, D):
    batch = make_batch(N, C, D, drift=drift, seed=3)
    scale = stepnft_terms(*(batch[k] for k in ("v_theta", "v_old", "x_t", "x_next", "A", "B", "std", "y"))
                          ).clip_scale
    frac_active = (scale < 1).double().mean().item()
    expected = {"inactive": (0.0, 0.0), "active": (1.0, 1.0), "mixed": (0.2, 0.9)}[regime]
    assert expected[0] <= frac_active <= expected[1], (
        f"test data not in the {regime} regime: {frac_active:.2f}")
    check64(*run_both(batch, make_mask(N, "partial")), what=f"clip {regime}")


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_labels_soft_and_hard(labels):
    batch = make_batch(211, 5, 32, labels=labels, seed=11)
    check64(*run_both(batch, None), what=f"labels={labels}")
    check64(*run_both(batch, None, loss="wmse"), what=f"wmse labels={labels}")


@pytest.mark.parametrize("kw", [{}, {"loss": "wmse"}, {"target": "x0"}])
def test_all_false_mask_gives_exact_zero(kw):
    """Documented behaviour (as the reference): an all-false mask gives loss 0 and a zero gradient."""
    batch = make_batch(37, 5, 7)
    l1, g1, l2, _ = run_both(batch, make_mask(37, "all_false"), **kw)
    assert l1.item() == 0.0 and l2.item() == 0.0
    assert torch.count_nonzero(g1) == 0, f"{torch.count_nonzero(g1)} non-zero gradient entries"


def test_grad_out_scaling_and_double_backward():
    """The backward scales the saved gradient by the incoming scalar, and can run twice (retain_graph)."""
    batch = make_batch(37, 5, 7)
    check64(*run_both(batch, make_mask(37, "partial"), grad_out=-3.5), what="grad_out=-3.5")
    v = batch["v_theta"].clone().requires_grad_(True)
    loss = fused_loss(v, *(batch[k] for k in ("v_old", "x_t", "x_next", "A", "B", "std", "y")))
    (g1,) = torch.autograd.grad(loss, v, retain_graph=True)
    (g2,) = torch.autograd.grad(2.0 * loss, v)
    assert_close(g2, 2.0 * g1, rtol=1e-12, atol=0.0, what="second backward")


def test_forward_only_matches_and_skips_grad():
    batch = make_batch(37, 5, 7)
    args = [batch[k] for k in ("v_theta", "v_old", "x_t", "x_next", "A", "B", "std", "y")]
    with torch.no_grad():
        l1 = fused_loss(*args)
    assert_close(l1, ref_loss(*args), rtol=RTOL64, atol=ATOL64, what="no_grad loss")
    _, _, grad = stepnft_loss_forward(*args, store_grad=False)
    assert grad is None


def test_strided_inputs():
    """v_theta and x_t as ``[:, :C]`` slices of ``[N, H, D]`` (the trainer supervises C of the H tokens)."""
    N, H, C, D = 37, 8, 5, 7
    full = make_batch(N, H, D, seed=5)
    batch = {k: (v[:, :C] if torch.is_tensor(v) and v.dim() == 3 else v) for k, v in full.items()}
    assert not batch["v_theta"].is_contiguous()
    check64(*run_both(batch, make_mask(N, "partial")), what="strided")


def test_block_size_does_not_change_result():
    batch = make_batch(1000, 5, 7)
    args = [batch[k] for k in ("v_theta", "v_old", "x_t", "x_next", "A", "B", "std", "y")]
    big = stepnft_loss_forward(*args, block_tokens=8192)
    small = stepnft_loss_forward(*args, block_tokens=512)  # 10 programs, partial sums over programs
    assert_close(small[0], big[0], rtol=1e-12, atol=0.0, what="loss across block sizes")
    assert_close(small[2], big[2], rtol=0.0, atol=0.0, what="grad across block sizes")


@pytest.mark.parametrize("kw", [{}, {"loss": "wmse"}, {"target": "x0", "max_drift": None}])
@pytest.mark.parametrize(("N", "C", "D"), [(37, 5, 7), (1000, 8, 32)])
def test_bfloat16_inputs(kw, N, C, D):
    """bf16 inputs, float32 accumulation: compared with the float64 reference on the same bf16-rounded inputs.

    Loss: rtol 1e-5 (float32 accumulation over <= C * D terms per token and a float32 mean). Gradient: rounded
    to bf16 twice (the saved per-token gradient, then the scaled result; nearest even, 2^-9 relative each), so
    up to 2^-8 relative; tolerance rtol 1e-2 plus 1e-3 of the largest entry for entries near zero.
    """
    batch = make_batch(N, C, D, dtype=torch.bfloat16, seed=9)
    l1, g1, l2, g2 = run_both(batch, make_mask(N, "partial"), **kw)
    assert l1.dtype == torch.float32 and g1.dtype == torch.bfloat16
    assert_close(l1, l2, rtol=1e-5, atol=1e-6, what="bf16 loss")
    assert_close(g1, g2, rtol=1e-2, atol=1e-3 * g2.abs().max().item(), what="bf16 grad")


def test_float32_inputs():
    """float32 inputs: loss rtol 1e-5, gradient rtol 1e-4 + 1e-5 of the largest entry (float32 rounding)."""
    batch = make_batch(1000, 5, 32, dtype=torch.float32, seed=4)
    l1, g1, l2, g2 = run_both(batch, make_mask(1000, "partial"))
    assert l1.dtype == torch.float32 and g1.dtype == torch.float32
    assert_close(l1, l2, rtol=1e-5, atol=1e-7, what="fp32 loss")
    assert_close(g1, g2, rtol=1e-4, atol=1e-5 * g2.abs().max().item(), what="fp32 grad")


def test_errors_are_clear():
    b = make_batch(5, 3, 4)
    args = [b[k] for k in ("v_theta", "v_old", "x_t", "x_next", "A", "B", "std", "y")]
    with pytest.raises(ValueError, match="x_t must have"):
        fused_loss(args[0], args[1], args[2][:, :2], *args[3:])
    with pytest.raises(ValueError, match="mask must be"):
        fused_loss(*args, torch.ones(5))
    with pytest.raises(ValueError, match="target='x0' needs"):
        fused_loss(*args, target="x0")
    with pytest.raises(ValueError, match="loss must be"):
        fused_loss(*args, loss="mse")
    with pytest.raises(ValueError, match="dtype"):
        fused_loss(args[0], args[1].float(), *args[2:])
    x_next = args[3].clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="v_theta only"):
        fused_loss(args[0].requires_grad_(True), args[1], args[2], x_next, *args[4:])
