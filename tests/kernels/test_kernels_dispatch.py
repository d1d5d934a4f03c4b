"""Kernel dispatch (``engine.kernels: auto | triton | torch``) and the plain package layout."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastnft.kernels as K
from fastnft import nft, sde


def test_torch_mode_returns_the_references():
    assert K.get_stepnft_loss("torch", "cpu") is nft.stepnft_loss
    assert K.get_sde_step("torch", "cpu") is sde.sde_step


def test_auto_on_cpu_returns_the_references():
    assert K.get_stepnft_loss("auto", "cpu") is nft.stepnft_loss
    assert K.get_sde_step("auto", torch.device("cpu")) is sde.sde_step


def test_triton_mode_under_interpreter_returns_fused():
    from fastnft.kernels.sde_step import sde_step as fused_step
    from fastnft.kernels.stepnft_loss import stepnft_loss as fused_loss

    assert K.get_stepnft_loss("triton", "cpu") is fused_loss
    assert K.get_sde_step("triton", "cpu") is fused_step


def test_package_is_a_plain_module_and_its_submodules_are_the_ops():
    """No module-class trick: ``fastnft.kernels.stepnft_loss`` is the op's module (the fused functions are reached
    through it or through the getters above)."""
    import fastnft.kernels.sde_step
    import fastnft.kernels.stepnft_loss  # noqa: F401

    assert type(K) is type(sys)
    assert K.stepnft_loss is sys.modules["fastnft.kernels.stepnft_loss"]
    assert K.sde_step is sys.modules["fastnft.kernels.sde_step"]


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="'auto', 'triton' or 'torch'"):
        K.get_stepnft_loss("fast", "cpu")


def test_auto_wrapper_falls_back_when_other_inputs_need_grad(monkeypatch):
    """``auto`` keeps the reference's semantics when an input other than v_theta requires grad."""
    monkeypatch.setattr(K, "_resolve", lambda mode, device: True)
    fn = K.get_stepnft_loss("auto", "cpu")
    g = torch.Generator().manual_seed(0)
    v, vo, xt, xn = (torch.randn(7, 3, 5, generator=g, dtype=torch.float64) for _ in range(4))
    A, B, std, y = torch.full((7,), 0.98), torch.full((7,), -0.25), torch.full((7,), 0.1), torch.ones(7)
    xn.requires_grad_(True)
    loss = fn(v.requires_grad_(True), vo, xt, xn, A, B, std, y)
    loss.backward()
    assert xn.grad is not None
    ref = nft.stepnft_loss(v.detach(), vo, xt, xn.detach(), A, B, std, y)
    assert torch.allclose(loss.detach(), ref, rtol=1e-9, atol=0)


def test_without_interpreter_cpu_is_refused_and_triton_not_imported():
    """In a fresh process without TRITON_INTERPRET: importing fastnft.kernels does not import triton, auto
    picks the reference, and ``triton`` on CPU raises an error naming the fix."""
    code = textwrap.dedent("""
        import sys
        import fastnft.kernels as K
        assert "triton" not in sys.modules, "import fastnft.kernels imported triton"
        from fastnft import nft
        assert K.get_stepnft_loss("auto", "cpu") is nft.stepnft_loss
        assert "triton" not in sys.modules, "auto on CPU imported triton"
        try:
            K.get_stepnft_loss("triton", "cpu")
        except RuntimeError as e:
            assert "kernels: torch" in str(e), str(e)
            print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # timeout: a hang guard only (a shared machine is slow)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr
