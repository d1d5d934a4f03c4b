"""Tolerance check that reports the mismatch count and the worst index (shared by the kernel tests)."""

from __future__ import annotations

import torch
from torch import Tensor


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, what: str) -> None:
    """Assert ``|actual - expected| <= atol + rtol |expected|`` elementwise (both cast to float64).

    The failure message gives the number of mismatching elements, the worst one's index and both values.
    """
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN counts as a mismatch
    if bad.any():
        excess = torch.where(bad, err - rtol * e.abs(), torch.zeros_like(err)).nan_to_num(float("inf"))
        flat = int(excess.argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} elements outside atol={atol:.2e} rtol={rtol:.2e}; "
            f"worst at "
            f"{idx}: got {a[idx].item():.10e}, expected {e[idx].item():.10e} (|diff| {err[idx].item():.3e})")
