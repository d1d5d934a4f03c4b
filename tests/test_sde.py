"""SPEC S1-S3: time grid, Flow-SDE coefficients, sampler shapes, determinism, noise 0 == ODE."""

import math

import pytest
import torch

from fastnft.sde import flow_sde_schedule, ode_step, sample_actions, sde_step

# SPEC S2 check values, K = 4, a = 0.2: (t, sigma, std, A, B)
SPEC_TABLE = [
    (1.0, 0.4, 0.2, 0.98, -0.25),
    (0.75, 0.3464, 0.1732, 0.98, -0.255),
    (0.5, 0.2, 0.1, 0.99, -0.255),
    (0.25, 0.1155, 0.0577, 0.99333, -0.255),
]


def test_time_grid_s1():
    s = flow_sde_schedule(4, 0.2)
    assert torch.allclose(s.t, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    assert s.delta == 0.25 and s.num_steps == 4


@pytest.mark.parametrize("i", range(4))
def test_coefficients_match_spec_table(i):
    s = flow_sde_schedule(4, 0.2)
    t, sigma, std, A, B = SPEC_TABLE[i]
    got = (float(s.t[i]), float(s.sigma[i]), float(s.std[i]), float(s.A[i]), float(s.B[i]))
    for name, g, w in zip(("t", "sigma", "std", "A", "B"), got, (t, sigma, std, A, B)):
        assert abs(g - w) < 5e-5, f"step {i} {name}: got {g}, SPEC says {w}"


def test_zero_noise_is_euler():
    s = flow_sde_schedule(5, 0.0)
    assert torch.all(s.std == 0) and torch.allclose(s.A, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(s.B, torch.full((5,), -0.2, dtype=torch.float64))


def test_sde_mean_is_affine_in_v():
    # S2a: mu(v1 + v2) - mu(v2) == B * v1 when A x_t is shared (noise z = 0)
    g = torch.Generator().manual_seed(0)
    x, v1, v2 = (torch.randn(3, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    s = flow_sde_schedule(4, 0.2)
    A, B, std = (c[1].expand(3) for c in (s.A, s.B, s.std))
    z = torch.zeros_like(x)
    lhs = sde_step(x, v1 + v2, A, B, std, z=z) - sde_step(x, v2, A, B, std, z=z)
    assert torch.allclose(lhs, B.view(3, 1, 1) * v1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_steps"):
        flow_sde_schedule(0, 0.2)
    with pytest.raises(ValueError, match="noise_level"):
        flow_sde_schedule(4, -0.1)
    with pytest.raises(ValueError, match=r"\[N, H, D\]"):
        sample_actions(lambda x, t: x, torch.zeros(3, 4), flow_sde_schedule(4, 0.2), stochastic=True)


def _linear_velocity(x, t):
    # a velocity field that depends on x and t, so a wrong time or state shows up
    return 0.5 * x + t.view(-1, 1, 1)


def test_sampler_shapes_and_recorded_tuple():
    N, H, D, K = 6, 4, 3, 4
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(N, H, D, generator=g)
    sch = flow_sde_schedule(K, 0.2)
    idx = torch.tensor([0, 1, 2, 3, 1, 2])
    rec = sample_actions(_linear_velocity, noise, sch, stochastic=True, step_index=idx, generator=g,
                         keep_trajectory=True)
    assert rec.actions.shape == (N, H, D) and rec.x_t.shape == (N, H, D) and rec.step.tolist() == idx.tolist()
    ar = torch.arange(N)
    assert torch.equal(rec.x_t, rec.states[ar, idx])
    assert torch.equal(rec.x_next, rec.states[ar, idx + 1])
    assert torch.equal(rec.v_old, rec.velocities[ar, idx])
    # v_old is the velocity at (x_{t_i}, t_i)
    t_i = sch.t.float()[idx]
    assert torch.allclose(rec.v_old, _linear_velocity(rec.x_t, t_i))
    assert torch.equal(rec.states[:, -1], rec.actions)


def test_sampler_deterministic_under_seed_and_different_otherwise():
    sch = flow_sde_schedule(4, 0.2)
    noise = torch.randn(8, 5, 2, generator=torch.Generator().manual_seed(3))

    def run(seed):
        return sample_actions(_linear_velocity, noise, sch, stochastic=True,
                              generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.actions, b.actions) and torch.equal(a.step, b.step)
    assert not torch.allclose(a.actions, c.actions)


def test_noise_level_zero_equals_ode():
    noise = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sde0 = sample_actions(_linear_velocity, noise, flow_sde_schedule(4, 0.0), stochastic=True,
                          generator=torch.Generator().manual_seed(1))
    ode = sample_actions(_linear_velocity, noise, flow_sde_schedule(4, 0.2), stochastic=False,
                         generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sde0.actions, ode.actions, atol=1e-12)
    # and the ODE path is the Euler recursion x <- x - delta v
    x = noise
    for i in range(4):
        x = ode_step(x, _linear_velocity(x, torch.full((4,), 1 - i / 4, dtype=torch.float64)), 0.25)
    assert torch.allclose(ode.actions, x)


def test_sde_step_noise_has_the_spec_std():
    # (x_next - mean) / std must be standard normal: the injected noise is std_i * z (S2b)
    s = flow_sde_schedule(4, 0.2)
    x = torch.zeros(20000, 1, 1, dtype=torch.float64)
    v = torch.zeros_like(x)
    out = sde_step(x, v, s.A[0].expand(20000), s.B[0].expand(20000), s.std[0].expand(20000),
                   generator=torch.Generator().manual_seed(0))
    z = out.flatten() / s.std[0]
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    assert math.isclose(float(s.std[0]), 0.2, rel_tol=1e-9)
