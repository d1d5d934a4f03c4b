"""SPEC S9: EMA decay schedule and the EMA rollout policy (CPU, no process group)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fastnft.engine import EMA, ema_decay
from fastnft.engine import dist as fdist


@pytest.mark.parametrize("iteration,total,expected", [
    (0, 100, 0.1),  # p = 0: start
    (25, 100, 0.23106971541902),  # p = 0.25: 0.995 - 0.895 * 0.5 * (1 + cos(pi/4))
    (50, 100, 0.5475),  # p = 0.5: midpoint (start + end) / 2
    (75, 100, 0.86393028458098),
    (100, 100, 0.995),  # p = 1: end
    (250, 100, 0.995),  # beyond T: clipped to p = 1
    (-3, 100, 0.1),  # before 0: clipped to p = 0
])
def test_s9_ema_decay_values(iteration: int, total: int, expected: float) -> None:
    assert ema_decay(iteration, total) == pytest.approx(expected, abs=1e-12)


def test_s9_ema_decay_custom_endpoints_and_monotone() -> None:
    assert ema_decay(0, 7, start=0.3, end=0.9) == pytest.approx(0.3)
    assert ema_decay(7, 7, start=0.3, end=0.9) == pytest.approx(0.9)
    vals = [ema_decay(i, 40) for i in range(41)]
    assert all(b > a for a, b in itertools.pairwise(vals))


@pytest.mark.parametrize("kwargs", [{"total": 0}, {"total": 10, "start": -0.1}, {"total": 10, "end": 1.5}])
def test_s9_ema_decay_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="ema_decay"):
        ema_decay(1, **kwargs)


class _Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.expert = nn.Linear(3, 5)
        self.vlm = nn.Linear(5, 5)  # frozen backbone stand-in
        self.vlm.requires_grad_(False)
        self.register_buffer("stat", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vlm(self.expert(x))


def test_s9_ema_update_math_and_frozen_params_untouched() -> None:
    live = _Policy()
    ema = EMA(live)
    assert ema.names == ["expert.weight", "expert.bias"]
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    old = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    frozen_before = ema.module.vlm.weight.detach().clone()
    with torch.no_grad():  # move every live parameter, the frozen ones too
        for p in live.parameters():
            p.add_(torch.randn_like(p))
    new = {n: p.detach().clone() for n, p in live.named_parameters()}
    ema.update(live, 0.75)
    got = dict(ema.module.named_parameters())
    for n in ema.names:
        torch.testing.assert_close(got[n], 0.75 * old[n] + 0.25 * new[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.module.vlm.weight, frozen_before, rtol=0, atol=0)
    assert not torch.equal(ema.module.vlm.weight, live.vlm.weight)
    assert ema.num_updates == 1
    # decay 1 keeps, decay 0 copies
    snap = ema.module.expert.weight.detach().clone()
    ema.update(live, 1.0)
    torch.testing.assert_close(ema.module.expert.weight, snap, rtol=0, atol=0)
    ema.update(live, 0.0)
    torch.testing.assert_close(ema.module.expert.weight, live.expert.weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decay"):
        ema.update(live, 1.5)


def test_ema_is_a_separate_copy_and_swap_restores() -> None:
    live = _Policy()
    ema = EMA(live)
    with torch.no_grad():
        live.expert.weight.add_(1.0)
    assert not torch.equal(live.expert.weight, ema.module.expert.weight)
    x = torch.randn(4, 3)
    want = ema.module(x)
    before = live.expert.weight.detach().clone()
    with ema.swapped_into(live) as m:
        torch.testing.assert_close(m(x), want)
    torch.testing.assert_close(live.expert.weight, before, rtol=0, atol=0)
    ema.copy_to(live)
    torch.testing.assert_close(live(x), want)


def test_ema_state_dict_round_trip_and_mismatch_error() -> None:
    live = _Policy()
    ema = EMA(live)
    with torch.no_grad():
        live.expert.bias.fill_(2.0)
    ema.update(live, 0.5)
    sd = ema.state_dict()
    other = EMA(_Policy())
    other.load_state_dict(sd)
    torch.testing.assert_close(other.module.expert.bias, ema.module.expert.bias, rtol=0, atol=0)
    assert other.num_updates == 1
    sd["params"]["expert.weight"] = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"expert\.weight.*\(5, 4\).*\(5, 3\)"):
        other.load_state_dict(sd)
    with pytest.raises(KeyError, match="lacks parameters"):
        ema.update(nn.Linear(3, 5), 0.5)


def test_ema_rejects_module_without_trainable_params() -> None:
    with pytest.raises(ValueError, match="requires_grad"):
        EMA(nn.Linear(2, 2).requires_grad_(False))


def test_dist_helpers_without_process_group() -> None:
    if fdist.is_initialized():
        pytest.skip("a process group was created earlier in this pytest process")
    assert (fdist.rank(), fdist.world_size(), fdist.is_main()) == (0, 1, True)
    fdist.barrier()
    t = torch.tensor([1.0, 3.0])
    assert fdist.all_reduce_mean(t) is t and t.tolist() == [1.0, 3.0]
    assert fdist.broadcast_object({"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match="float"):
        fdist.all_reduce_mean(torch.tensor([1, 2]))
