"""Kernel check of ``fastnft doctor`` (``kernels_interpreted`` / ``kernels_cuda``; also ``python -m
fastnft.doctor.kernels cuda|cpu``). The doctor runs it in a child whose ``TRITON_INTERPRET`` is set (cpu) or unset
(cuda) before the kernels are defined. Compares
the fused StepNFT loss (value and gradient) with the float64 reference for every S8 variant, on strided
``[:, :C]`` slices of ``[N, H, D]`` inputs and on the edge shapes C = 1 and D = 1, in float32, bfloat16 and
float16 on CUDA (float32 in the interpreter, which is slow); and the fused SDE step with explicit noise against
the reference. :func:`main` returns the detail line or raises.
"""

from __future__ import annotations

import json
import sys

import torch

VARIANTS = [{}, {"branches": "positive"}, {"branches": "negative"}, {"loss": "wmse"},
            {"loss": "wmse", "branches": "positive"}, {"loss": "wmse", "branches": "negative"},
            {"target": "x0"}, {"max_drift": None}]
# tolerance on the gradient relative to its largest entry, and on the loss: float32 accumulates in float32;
# 16-bit inputs are rounded once (8 / 11 mantissa bits) and the reference sees the same rounded values
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _compare(device: torch.device, dtype: torch.dtype, N: int, H: int, C: int, D: int, kw: dict, g) -> None:
    from fastnft.kernels import get_stepnft_loss
    from fastnft.nft import stepnft_loss as ref
    from fastnft.sde import flow_sde_schedule

    fused = get_stepnft_loss("triton", device)
    sch = flow_sde_schedule(4, 0.2).to(device)
    i = torch.randint(0, 4, (N,), generator=g, device=device)
    A, B, std, t = sch.A[i], sch.B[i], sch.std[i], sch.t[i]
    full = [torch.randn(N, H, D, generator=g, device=device, dtype=torch.float64) for _ in range(5)]
    full[0] = full[1] + 0.4 * full[0]  # v_theta near v_old: the drift clip is partly active
    big = [u.to(dtype) for u in full]
    y = 2 * torch.rand(N, generator=g, device=device, dtype=torch.float64) - 1
    mask = torch.rand(N, generator=g, device=device) < 0.8
    extra = {"t": t, "x0": big[4][:, :C]} if kw.get("target") == "x0" else {}
    v1 = big[0].clone().requires_grad_(True)
    l1 = fused(v1[:, :C], *(u[:, :C] for u in big[1:4]), A, B, std, y, mask, **kw, **extra)
    l1.backward()
    v2 = big[0].double().requires_grad_(True)
    extra2 = {"t": t, "x0": big[4][:, :C].double()} if extra else {}
    l2 = ref(v2[:, :C], *(u[:, :C].double() for u in big[1:4]), A, B, std, y, mask, **kw, **extra2)
    l2.backward()
    tol = TOL[dtype]
    where = f"{dtype} N={N} H={H} C={C} D={D} {kw}"
    if abs(l1.item() - l2.item()) > tol * max(1.0, abs(l2.item())):
        raise AssertionError(f"loss {where}: fused {l1.item():.8g} vs reference {l2.item():.8g}")
    err = (v1.grad.double() - v2.grad).abs().max().item()
    if err > tol * max(v2.grad.abs().max().item(), 1e-6):
        raise AssertionError(f"grad {where}: max error {err:.3e} vs max |grad| {v2.grad.abs().max().item():.3e}")


def main(device_name: str) -> str:
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if device.type == "cuda" else [torch.float32]
    shapes = [(37, 8, 5, 7), (13, 3, 1, 5), (11, 4, 3, 1)] if device.type == "cpu" else \
        [(37, 8, 5, 7), (13, 3, 1, 5), (11, 4, 3, 1), (2048, 8, 5, 32)]
    g = torch.Generator(device=device).manual_seed(0)
    n = 0
    for dtype in dtypes:
        for shape in shapes:
            for kw in VARIANTS:
                _compare(device, dtype, *shape, kw, g)
                n += 1
    from fastnft.kernels.sde_step import fused_sde_step
    from fastnft.sde import sde_step as ref_step

    for dtype in dtypes:
        x, v, z = (torch.randn(37, 5, 7, generator=g, device=device).to(dtype) for _ in range(3))
        A, B, std = (torch.rand(37, 3, generator=g, device=device)[:, 1] for _ in range(3))  # strided [N]
        out = fused_sde_step(x, v, A, B, std, z=z).double()
        exp = ref_step(x.double(), v.double(), A.double(), B.double(), std.double(), z=z.double())
        err = (out - exp).abs().max().item()
        if err > TOL[dtype] * max(exp.abs().max().item(), 1.0):
            raise AssertionError(f"sde step {dtype}: max error {err:.3e}")
        n += 1
    kind = "compiled" if device.type == "cuda" else "interpreted"
    return f"{n} comparisons ({kind}; {', '.join(str(d).split('.')[-1] for d in dtypes)}; 8 variants; " \
           "strided, C=1, D=1) within tolerance"


if __name__ == "__main__":
    print(json.dumps({"detail": main(sys.argv[1] if len(sys.argv) > 1 else "cpu")}))
