"""Policy precision (issue 7, part 3): bf16 compute under autocast, fp32 boundary and fp32 master weights."""

import pytest
import torch

from fastnft.config import NFTConfig, PolicyConfig
from fastnft.nft import stepnft_loss
from fastnft.policies.state_flow import StateFlowPolicy


def _pair():
    torch.manual_seed(0)
    p32 = StateFlowPolicy(5, 3, PolicyConfig(horizon=6, n_action_steps=4, width=32, depth=2, heads=4))
    p16 = StateFlowPolicy(5, 3, PolicyConfig(horizon=6, n_action_steps=4, width=32, depth=2, heads=4))
    p16.load_state_dict(p32.state_dict())
    return p32, p16.set_precision("bfloat16")


def test_bf16_velocity_is_fp32_close_to_fp32_and_not_identical():
    p32, p16 = _pair()
    g = torch.Generator().manual_seed(1)
    x, t, obs = torch.randn(7, 6, 3, generator=g), torch.rand(7, generator=g), torch.randn(7, 5, generator=g)
    v32, v16 = p32(x, t, obs), p16(x.double(), t.double(), obs.double())  # inputs of any float dtype are cast
    assert v16.dtype == torch.float32 and v32.dtype == torch.float32
    assert not torch.equal(v16, v32), "bf16 mode computed in fp32"
    torch.testing.assert_close(v16, v32, rtol=0.05, atol=0.05)  # bf16 has 8 mantissa bits


def test_bf16_gradients_reach_fp32_masters_and_the_loss_is_fp32():
    _, p16 = _pair()
    g = torch.Generator().manual_seed(2)
    N, C = 5, 4
    x, obs = torch.randn(N, 6, 3, generator=g), torch.randn(N, 5, generator=g)
    v = p16(x, torch.rand(N, generator=g), obs)[:, :C]
    v_old = (v + 0.1 * torch.randn(v.shape, generator=g)).detach()
    A, B, std = torch.full((N,), 0.98), torch.full((N,), -0.25), torch.full((N,), 0.2)
    loss = stepnft_loss(v, v_old, x[:, :C], torch.randn(N, C, 3, generator=g), A, B, std,
                        torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0]), max_drift=NFTConfig().max_drift)
    assert loss.dtype == torch.float32
    loss.backward()
    for name, p in p16.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name


def test_unknown_precision_is_refused():
    p32, _ = _pair()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        p32.set_precision("float16")
