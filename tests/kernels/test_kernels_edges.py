"""Launcher edge cases of issue 16, under the Triton interpreter: an empty batch (N = 0) launches nothing and
matches the reference, a user SDE ``block`` that is not a power of two is refused with the fix, the GPU launch
configurations keep few elements per thread (G5), and the sampler with the fused step has no host sync."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastnft.nft import stepnft_loss as ref_loss

loss_mod = importlib.import_module("fastnft.kernels.stepnft_loss")
sde_mod = importlib.import_module("fastnft.kernels.sde_step")


def _batch(N: int, C: int = 5, D: int = 4):
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(N, C, D, generator=g) for _ in range(4)]
    coef = [torch.rand(N, generator=g) for _ in range(4)]
    return big, coef


@pytest.mark.parametrize("mask", [True, False])
def test_empty_batch_loss_is_zero_with_an_empty_gradient(mask):
    assert loss_mod.INTERPRETED
    big, coef = _batch(0)
    m = torch.ones(0, dtype=torch.bool) if mask else None
    v1 = big[0].clone().requires_grad_(True)
    v2 = big[0].clone().requires_grad_(True)
    l1 = loss_mod.stepnft_loss(v1, *big[1:], *coef, m)
    l2 = ref_loss(v2, *big[1:], *coef, m)
    l1.backward()
    l2.backward()
    assert l1.dtype == torch.float32 and l1.shape == () and float(l1) == 0.0
    if mask:  # the reference's masked mean over no valid sample is 0 too (unmasked, it takes an empty mean: NaN)
        assert float(l2) == 0.0
    assert v1.grad is not None and v1.grad.shape == (0, 5, 4)
    with torch.no_grad():
        assert float(loss_mod.stepnft_loss(big[0], *big[1:], *coef, m)) == 0.0  # forward-only path
    loss, inv, grad = loss_mod.stepnft_loss_forward(big[0], *big[1:], *coef, m)
    assert float(loss) == 0.0 and float(inv) == pytest.approx(1 / 5) and grad.shape == (0, 5, 4)  # S7: 1 / (C * max(valid, 1))


def test_empty_batch_launches_no_kernel(monkeypatch):
    class Refuse:
        def __getitem__(self, grid):
            raise AssertionError(f"kernel launched for an empty batch (grid {grid})")

    monkeypatch.setattr(loss_mod, "_stepnft_fwd_kernel", Refuse())
    monkeypatch.setattr(loss_mod, "_finish_kernel", Refuse())
    monkeypatch.setattr(sde_mod, "_sde_step_kernel", Refuse())
    big, coef = _batch(0)
    loss_mod.stepnft_loss_forward(big[0], *big[1:], *coef, None)
    out = sde_mod.fused_sde_step(big[0], big[1], coef[0], coef[1], coef[2], seed=3)
    assert out.shape == (0, 5, 4)


@pytest.mark.parametrize("shape", [(3, 0, 4), (3, 5, 0)])
def test_no_step_or_no_action_dim_is_a_clear_error(shape):
    big = [torch.randn(*shape) for _ in range(4)]
    coef = [torch.rand(3) for _ in range(4)]
    with pytest.raises(ValueError, match="n_action_steps"):
        loss_mod.stepnft_loss_forward(*big, *coef, None)


@pytest.mark.parametrize("block", [3, 100, 0, -4])
def test_sde_block_must_be_a_power_of_two(block):
    x, v = torch.randn(4, 8, 4), torch.randn(4, 8, 4)
    with pytest.raises(ValueError, match="power of two"):
        sde_mod.fused_sde_step(x, v, 0.9, -0.2, 0.1, seed=1, block=block)
    with pytest.raises(ValueError, match="power of two"):  # also when there is nothing to compute
        sde_mod.fused_sde_step(x[:0], v[:0], 0.9, -0.2, 0.1, seed=1, block=block)


def test_sde_power_of_two_blocks_agree():
    x, v = torch.randn(6, 8, 4), torch.randn(6, 8, 4)
    a = sde_mod.fused_sde_step(x, v, 0.9, -0.2, 0.1, seed=1, block=4)
    b = sde_mod.fused_sde_step(x, v, 0.9, -0.2, 0.1, seed=1, block=64)
    assert torch.equal(a, b)


def test_gpu_launch_configs_keep_few_elements_per_thread():
    """The configurations the launchers pick on a GPU (the ones bench/kernel_compile.json compiles without
    spills): at most 4 loss elements (tokens x padded action dims) and 4 Philox counters per thread."""
    cuda = torch.device("cuda")
    for T, D in [(2560, 4), (185, 4), (1600, 32), (160, 32), (7, 3), (1, 1)]:
        bt, bd, w = loss_mod._launch_config(T, D, cuda, None)
        assert bt * bd <= 1024 and bt * bd <= 4 * 32 * w, (T, D, bt, bd, w)
    for quarter in (16, 512, 4000, 10**6):
        block, w = sde_mod._launch_config(quarter, cuda, None)
        assert block <= 4 * 32 * w and block <= 512
    assert sde_mod._launch_config(10**6, cuda, 1024) == (1024, 8)


@pytest.mark.parametrize("stochastic", [True, False])
def test_sampler_with_the_fused_step_has_no_host_sync(stochastic):
    """The K-step sampler with the fused SDE step (one Philox seed per call, drawn on the device) reads nothing
    back to the host (fastnft.testing.syncs)."""
    from fastnft.sde import flow_sde_schedule, sample_actions
    from fastnft.testing.syncs import SyncCounter

    with SyncCounter() as syncs:
        sample_actions(lambda x, t: x * t[:, None, None], torch.randn(5, 6, 2), flow_sde_schedule(4, 0.3),
                       stochastic=stochastic, generator=torch.Generator().manual_seed(0), step_fn=sde_mod.sde_step)
    assert syncs.total == 0, syncs.report()
