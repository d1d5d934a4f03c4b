"""Kernel risks of the issue-7 review (part 7), under the Triton interpreter.

1. The int32 offset bound holds for strided inputs: it is the largest element offset (``N * stride_n`` for a
   ``[:, :C]`` slice of ``[N, H, D]``), not ``N * C * D``; past 2^31 the kernels switch to int64 offsets. The
   int64 path is run here on small inputs by lowering the switch-over limit.
2. One SDE solver step of the sampler is one kernel launch: one Philox seed per sampling call, no per-step
   seed draws and no per-step coefficient tensors.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _kernel_compare import assert_close
from test_kernels_stepnft_loss import make_batch

from fastnft.nft import stepnft_loss as ref_loss
from fastnft.sde import flow_sde_schedule, sample_actions

# the modules (fastnft.kernels keeps the same-named functions as its attributes)
sde_mod = importlib.import_module("fastnft.kernels.sde_step")
loss_mod = importlib.import_module("fastnft.kernels.stepnft_loss")


def test_offset_bound_counts_strides_not_the_slice():
    big = torch.empty(2**20, 65, 32, device="meta")  # a [N, H, D] buffer of > 2^31 elements, no storage
    sl = big[:, :5]  # [N, C, D] slice: N * C * D = 1.7e8 < 2^31, but offsets reach N * H * D
    assert sl.numel() < 2**31 <= loss_mod.offset_bound(sl)
    assert loss_mod.offset_bound(torch.empty(7, 5, 3)) == 105
    assert loss_mod.offset_bound(torch.empty(7, 8, 3)[:, :5]) == 6 * 24 + 4 * 3 + 3


@pytest.mark.parametrize("kw", [{}, {"loss": "wmse"}, {"branches": "negative"}, {"max_drift": None}])
def test_loss_int64_offsets_match_reference(monkeypatch, kw):
    monkeypatch.setattr(loss_mod, "_INT32_LIMIT", 64)  # every launch below takes the int64 path
    N, H, C, D = 37, 8, 5, 7
    b = make_batch(N, H, D, dtype=torch.float64, seed=3)
    vt, vo, xt, xn, A, B, std, y = (b[k] for k in ("v_theta", "v_old", "x_t", "x_next", "A", "B", "std", "y"))
    vt = vt.clone().requires_grad_(True)
    sl = (vt[:, :C], vo[:, :C], xt[:, :C], xn[:, :C])
    l1 = loss_mod.stepnft_loss(*sl, A, B, std, y, None, **kw)
    (g1,) = torch.autograd.grad(l1, vt)
    l2 = ref_loss(*sl, A, B, std, y, None, **kw)
    (g2,) = torch.autograd.grad(l2, vt)
    assert_close(l1, l2, rtol=1e-7, atol=1e-9, what="loss, int64 offsets")
    assert_close(g1, g2, rtol=1e-7, atol=1e-9, what="grad, int64 offsets")


def test_sde_step_int64_offsets_match_reference(monkeypatch):
    from fastnft.sde import sde_step as ref_step

    monkeypatch.setattr(sde_mod, "_INT32_LIMIT", 64)
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(37, 5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    A, B, std = (torch.rand(37, 3, generator=g, dtype=torch.float64)[:, 1] for _ in range(3))  # strided [N]
    assert_close(sde_mod.fused_sde_step(x, v, A, B, std, z=z), ref_step(x, v, A, B, std, z=z), rtol=1e-14,
                 atol=1e-14, what="sde step, int64 offsets")


def test_one_launch_per_sde_step_and_one_seed_per_call(monkeypatch):
    calls = {"step": 0, "seed": 0}
    real_step, real_seed = sde_mod.fused_sde_step, sde_mod.philox_seed

    def step(*a, **k):
        calls["step"] += 1
        assert isinstance(k.get("seed"), torch.Tensor) and k.get("z") is None
        return real_step(*a, **k)

    def seed(*a, **k):
        calls["seed"] += 1
        return real_seed(*a, **k)

    monkeypatch.setattr(sde_mod, "fused_sde_step", step)
    monkeypatch.setattr(sde_mod, "philox_seed", seed)
    ops = []

    class Count(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    K = 4
    noise = torch.randn(37, 5, 7, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    sch32 = flow_sde_schedule(K, 0.2).to(dtype=torch.float32)
    with Count():
        rec = sample_actions(lambda x, t: x, noise, sch32,
                             stochastic=True, generator=g, step_fn=sde_mod.sde_step,
                             step_index=torch.zeros(37, dtype=torch.long))
    assert calls == {"step": K, "seed": 1}
    # no coefficient arithmetic per step: no `coef * ones` multiplications, no per-step random draws
    assert not any("aten.mul" in o for o in ops), [o for o in ops if "mul" in o]
    assert sum("random" in o or "randint" in o for o in ops) == 1
    # each step draws its own noise: the recorded first transition is not the deterministic mean
    sch = flow_sde_schedule(K, 0.2)
    mean0 = float(sch.A[0]) * noise + float(sch.B[0]) * noise
    assert not torch.allclose(rec.x_next, mean0)


def test_bound_step_draws_independent_noise_per_step():
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(64, 8, 4)
    step = sde_mod.bind_sde_step(g, x)
    one = torch.ones(())
    a, b = step(x, x, one, one, one), step(x, x, one, one, one)  # x_next = z: the raw noise of steps 0 and 1
    assert not torch.equal(a, b)
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.1
