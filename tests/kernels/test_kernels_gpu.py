"""Compiled (real GPU) runs of the fused kernels vs the references. Skipped without a CUDA device.

The interpreter is switched on for this whole test process (conftest), so the compiled kernels run in a child
process without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU for compiled Triton kernels")]

SCRIPT = textwrap.dedent("""
    import torch
    from fastnft.kernels import get_sde_step, get_stepnft_loss
    from fastnft.nft import stepnft_loss as ref
    from fastnft.sde import sde_step as ref_step, flow_sde_schedule
    from fastnft.kernels.sde_step import fused_sde_step
    fused = get_stepnft_loss("auto", "cuda")
    assert fused is not ref, "auto did not pick the fused kernel on CUDA"
    g = torch.Generator(device="cuda").manual_seed(0)
    sch = flow_sde_schedule(4, 0.2).to("cuda", torch.float32)
    for (N, C, D) in [(1, 1, 3), (37, 5, 7), (1000, 8, 32), (2048, 5, 32)]:
        for dt, rtol in [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)]:
            for kw in [{}, {"loss": "wmse"}, {"branches": "negative"}, {"max_drift": None}]:
                i = torch.randint(0, 4, (N,), device="cuda", generator=g)
                A, B, std = sch.A[i], sch.B[i], sch.std[i]
                vo, xt = (torch.randn(N, C, D, device="cuda", generator=g) for _ in range(2))
                vt = vo + 0.3 * torch.randn(N, C, D, device="cuda", generator=g)
                xn = A.view(-1, 1, 1) * xt + B.view(-1, 1, 1) * vo + std.view(-1, 1, 1) * torch.randn_like(xt)
                y = 2 * torch.rand(N, device="cuda", generator=g) - 1
                mask = torch.rand(N, device="cuda", generator=g) < 0.7
                big = [u.to(dt) for u in (vt, vo, xt, xn)]
                v1 = big[0].clone().requires_grad_(True)
                l1 = fused(v1, *big[1:], A, B, std, y, mask, **kw); l1.backward()
                v2 = big[0].double().requires_grad_(True)
                l2 = ref(v2, *(u.double() for u in big[1:]), A, B, std, y, mask, **kw); l2.backward()
                assert torch.allclose(l1.double(), l2, rtol=1e-4, atol=1e-6), (N, C, D, dt, kw, l1.item(),
                                                                               l2.item())
                err = (v1.grad.double() - v2.grad).abs().max().item()
                assert err <= rtol * v2.grad.abs().max().item() + 1e-7, (N, C, D, dt, kw, err)
    x, v, z = (torch.randn(1000, 8, 32, device="cuda") for _ in range(3))
    A, B, std = (torch.rand(1000, device="cuda") for _ in range(3))
    assert torch.allclose(fused_sde_step(x, v, A, B, std, z=z), ref_step(x, v, A, B, std, z=z), atol=1e-6)
    a = fused_sde_step(x, v, A, B, std, seed=5); b = fused_sde_step(x, v, A, B, std, seed=5)
    assert torch.equal(a, b)
    zz = ((a - (A.view(-1, 1, 1) * x + B.view(-1, 1, 1) * v)) / std.view(-1, 1, 1)).double()
    m, s2 = zz.mean().item(), zz.var().item()
    assert abs(m) < 0.01 and abs(s2 - 1) < 0.02, (m, s2)
    step = get_sde_step("auto", "cuda")
    assert step is not ref_step
    step(x, v, A, B, std, generator=g)
    print("OK")
""")


def test_compiled_kernels_match_references_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-3000:] + res.stderr[-3000:]
