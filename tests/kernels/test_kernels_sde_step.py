"""Fused Flow-SDE step vs the reference ``fastnft.sde.sde_step`` (SPEC S2), under the Triton interpreter."""

from __future__ import annotations

import math

import pytest
import torch
from _kernel_compare import assert_close

from fastnft import sde as ref
from fastnft.kernels.sde_step import INTERPRETED, fused_sde_step, ode_step, sde_step
from fastnft.sde import flow_sde_schedule, sample_actions


def make_state(N: int, H: int, D: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    v = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    z = torch.randn(N, H, D, generator=g, dtype=torch.float64)
    sch = flow_sde_schedule(4, 0.2)
    i = torch.randint(0, 4, (N,), generator=g)
    return x.to(dtype), v.to(dtype), z.to(dtype), sch.A[i], sch.B[i], sch.std[i]


def test_kernels_are_interpreted():
    assert INTERPRETED, "TRITON_INTERPRET=1 must be set before fastnft.kernels.sde_step is imported"


@pytest.mark.parametrize("D", [3, 7, 32])
@pytest.mark.parametrize("H", [1, 5, 8])
@pytest.mark.parametrize("N", [1, 37, 1000])
def test_explicit_noise_matches_reference(N, H, D):
    """With ``z`` given, the fused step is the reference's S2 transition (float64, exact up to rounding)."""
    x, v, z, A, B, std = make_state(N, H, D, seed=N + H + D)
    assert_close(fused_sde_step(x, v, A, B, std, z=z), ref.sde_step(x, v, A, B, std, z=z), rtol=1e-14,
                 atol=1e-14, what=f"sde step N={N} H={H} D={D}")


def test_coefficient_forms():
    """[N] tensors (also strided), 0-d tensors and Python numbers give the same transition."""
    x, v, z, A, B, std = make_state(37, 5, 7)
    expected = ref.sde_step(x, v, A, B, std, z=z)
    A2 = torch.stack([A, A], 1)[:, 0]  # stride 2
    assert A2.stride(0) == 2
    assert_close(fused_sde_step(x, v, A2, B, std, z=z), expected, rtol=1e-14, atol=1e-14, what="strided A")
    for a, b, s in [(0.98, -0.25, 0.2), (torch.tensor(0.98, dtype=torch.float64), -0.25, torch.tensor(0.2))]:
        exp = ref.sde_step(x, v, a, b, s, z=z)
        assert_close(fused_sde_step(x, v, a, b, s, z=z), exp, rtol=1e-7, atol=1e-7,
                     what=f"scalars {a} {b} {s}")


def test_ode_step_and_zero_std():
    """S2c: the fused Euler step, and std = 0 as a number compiles the noise out (no seed needed)."""
    x, v, _, A, B, _ = make_state(37, 5, 7)
    assert_close(ode_step(x, v, 0.25), ref.ode_step(x, v, 0.25), rtol=1e-15, atol=1e-15, what="ode step")
    out = fused_sde_step(x, v, A, B, 0.0)
    assert_close(out, A.view(-1, 1, 1) * x + B.view(-1, 1, 1) * v, rtol=1e-15, atol=1e-15, what="std=0")
    # a zero std tensor: same result, noise drawn and multiplied by zero
    out_t = fused_sde_step(x, v, A, B, torch.zeros(37, dtype=torch.float64), seed=1)
    assert_close(out_t, out, rtol=0, atol=0, what="std=0 tensor")


def test_same_seed_same_sample_different_seed_differs():
    x, v, _, A, B, std = make_state(1000, 8, 32, dtype=torch.float32)
    a = fused_sde_step(x, v, A, B, std, seed=1234)
    b = fused_sde_step(x, v, A, B, std, seed=1234)
    assert torch.equal(a, b), f"same seed: {int((a != b).sum())} elements differ"
    for other in (fused_sde_step(x, v, A, B, std, seed=1235), fused_sde_step(x, v, A, B, std, seed=1234,
                                                                             offset=a.numel())):
        same = (other == a).double().mean().item()
        assert same < 1e-3, f"different seed/offset: {same:.2%} of elements equal"
    # the seed may be a device tensor (graph-capturable); same value, same stream
    c = fused_sde_step(x, v, A, B, std, seed=torch.tensor([1234]))
    assert torch.equal(a, c)


def test_block_size_does_not_change_noise():
    x, v, _, A, B, std = make_state(1000, 5, 7, dtype=torch.float32)
    a = fused_sde_step(x, v, A, B, std, seed=7, block=64)
    b = fused_sde_step(x, v, A, B, std, seed=7, block=1 << 16)
    assert torch.equal(a, b), f"{int((a != b).sum())} elements differ between block sizes"


def test_noise_moments_standard_normal():
    """``(x_next - mean) / std`` over 256000 draws: mean, variance, skewness, kurtosis, P(|z| < 1) and the
    correlation between the four lanes of one Philox call each within 5 standard errors of N(0, 1)."""
    N, H, D = 1000, 8, 32
    x, v, _, A, B, _ = make_state(N, H, D, dtype=torch.float32, seed=3)
    std = 0.05 + torch.rand(N, generator=torch.Generator().manual_seed(4))
    out = fused_sde_step(x, v, A, B, std, seed=99)
    mean = A.view(-1, 1, 1).float() * x + B.view(-1, 1, 1).float() * v
    z = ((out - mean) / std.view(-1, 1, 1)).double().flatten()
    n = z.numel()
    se = {"mean": 1 / math.sqrt(n), "var": math.sqrt(2 / n), "skew": math.sqrt(6 / n),
          "kurt": math.sqrt(24 / n)}
    zc = z - z.mean()
    stats = {"mean": (z.mean().item(), 0.0), "var": (zc.pow(2).mean().item(), 1.0),
             "skew": ((zc.pow(3).mean() / zc.pow(2).mean() ** 1.5).item(), 0.0),
             "kurt": ((zc.pow(4).mean() / zc.pow(2).mean() ** 2).item(), 3.0)}
    for name, (got, want) in stats.items():
        assert abs(got - want) < 5 * se[name] + 2e-4, (
            f"{name}: {got:.5f} vs {want} (5 se = {5 * se[name]:.5f})")
    p = 0.6826894921370859
    frac = (z.abs() < 1).double().mean().item()
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n), f"P(|z|<1) = {frac:.5f}, expected {p:.5f}"
    q = math.ceil(n / 4)  # element k*Q + i holds lane k of counter i
    lanes = [z[k * q:(k + 1) * q] for k in range(4)]
    for k in range(3):
        corr = torch.corrcoef(torch.stack([lanes[k], lanes[k + 1]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(q), f"lane {k} vs {k + 1}: correlation {corr:.5f}"


def test_step_fn_with_generator_in_sampler():
    """The fused step is a ``StepFn`` of ``sample_actions``: reproducible from the generator's state, and
    successive calls draw fresh noise."""
    sch = flow_sde_schedule(4, 0.2)
    noise = torch.randn(37, 5, 7, generator=torch.Generator().manual_seed(0))

    def run(seed: int):
        g = torch.Generator().manual_seed(seed)
        return sample_actions(lambda x, t: 0.5 * x, noise, sch, stochastic=True, generator=g,
                              step_fn=sde_step)

    r1, r2, r3 = run(1), run(1), run(2)
    assert torch.equal(r1.actions, r2.actions) and torch.equal(r1.x_next, r2.x_next)
    assert not torch.equal(r1.actions, r3.actions)
    x, v, _, A, B, std = make_state(37, 5, 7, dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(sde_step(x, v, A, B, std, generator=g), sde_step(x, v, A, B, std, generator=g))


def test_bfloat16_state():
    """bf16 state: float32 arithmetic, one rounding to bf16 (nearest even): within 1 bf16 ulp (2^-8 relative,
    plus 1e-2 absolute for results near 0 where ulps are taken from the larger operands)."""
    x, v, z, A, B, std = make_state(1000, 8, 32, dtype=torch.bfloat16)
    out = fused_sde_step(x, v, A, B, std, z=z)
    assert out.dtype == torch.bfloat16
    exp = ref.sde_step(x.double(), v.double(), A, B, std, z=z.double())
    assert_close(out, exp, rtol=2**-8, atol=1e-2, what="bf16 step")


def test_errors_are_clear():
    x, v, z, A, B, std = make_state(5, 3, 4)
    with pytest.raises(ValueError, match="share a shape"):
        fused_sde_step(x, v[:, :2], A, B, std, z=z)
    with pytest.raises(ValueError, match="needs a seed"):
        fused_sde_step(x, v, A, B, std)
    with pytest.raises(ValueError, match=r"\[N\] = \[5\]"):
        fused_sde_step(x, v, A[:3], B, std, seed=0)
