"""Benchmarks of the fused kernels vs the eager reference and ``torch.compile`` of it (pytest-benchmark).

Run: ``pytest bench/ --benchmark-json=bench/results.json`` (see bench/README.md). Each result's ``extra_info``
holds the device, its measured copy bandwidth, the time (GPU time by CUDA events on a GPU, else the wall-clock
median), the bytes the provider must move, the achieved GB/s and its fraction of the copy bandwidth.
"""

from __future__ import annotations

import functools

import pytest
import torch
from _bench_utils import gpu_time_ms, loss_bytes, loss_inputs, sde_bytes, sync

from fastnft.nft import stepnft_loss as ref_loss
from fastnft.sde import sde_step as ref_step

PROVIDERS = ["triton", "torch", "compile"]
LOSS_SIZES = [(2048, 5, 32), (8192, 8, 32), (16384, 8, 32), (32768, 8, 32), (131072, 8, 32)]
LOSS_CPU = {("fwd_bwd", (2048, 5, 32)), ("fwd_bwd", (16384, 8, 32)), ("fwd", (2048, 5, 32)),
            ("fwd", (16384, 8, 32)), ("fwd", (131072, 8, 32))}
SDE_SIZES = [(64, 8, 32), (256, 8, 32), (1024, 8, 32), (16384, 8, 32), (131072, 8, 32)]
SDE_CPU = {(64, 8, 32), (1024, 8, 32), (16384, 8, 32)}


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _impl(provider: str, device: torch.device, kind: str):
    ref = ref_loss if kind == "loss" else ref_step
    if provider == "torch":
        return ref
    if provider == "compile":
        return _compiled(ref)
    if device.type != "cuda":
        pytest.skip("triton provider needs a CUDA GPU (the CPU interpreter is a test vehicle, not a fast "
                    "path)")
    from fastnft.kernels import get_sde_step, get_stepnft_loss

    return (get_stepnft_loss if kind == "loss" else get_sde_step)("triton", device)


def _measure(benchmark, fn, device: torch.device, nbytes: int, copy_bw: dict, rounds: int) -> None:
    """Warm up (compiles), time, and record time, bytes, GB/s and the fraction of copy bandwidth."""
    try:
        fn()  # warm-up: triton JIT / inductor compilation happens here
        sync(device)
    except Exception as e:  # noqa: BLE001 - a provider that cannot run here is skipped, not a crash
        pytest.skip(f"provider failed to build/run on {device}: {type(e).__name__}: {str(e)[:200]}")

    def run():
        fn()
        sync(device)

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    if device.type == "cuda":
        med, q10, q90 = gpu_time_ms(fn)
        timer = "cuda_events"
    else:
        st = benchmark.stats.stats
        med, q10, q90 = st.median * 1e3, st.min * 1e3, st.max * 1e3
        timer = "wall_clock"
    gbps = nbytes / (med / 1e3) / 1e9
    benchmark.extra_info.update({
        **copy_bw, "timer": timer, "time_ms": med, "time_ms_q10": q10, "time_ms_q90": q90, "bytes": nbytes,
        "gbps": gbps, "frac_copy_bw": gbps / copy_bw["copy_gbps"],
    })


def _rounds(device: torch.device, numel: int) -> int:
    if device.type == "cuda":
        return 50
    return max(3, min(30, 2 ** 24 // max(numel, 1)))


@pytest.mark.parametrize("dtype", [torch.float32], ids=["fp32"])
@pytest.mark.parametrize("size", LOSS_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd_bwd", "fwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_stepnft_loss(benchmark, provider, mode, size, dtype, device, full_sweep, copy_bw):
    if not full_sweep and (mode, size) not in LOSS_CPU:
        pytest.skip("not in the reduced CPU sweep (pass --kernel-sizes=full to run it)")
    N, C, D = size
    benchmark.group = f"stepnft_loss {mode} {N}x{C}x{D} {str(dtype)[6:]}"
    fn_loss = _impl(provider, device, "loss")
    big, (A, B, std, y, mask) = loss_inputs(N, C, D, dtype, device)
    v = big[0].clone().requires_grad_(mode == "fwd_bwd")

    if mode == "fwd_bwd":
        def fn():
            loss = fn_loss(v, *big[1:], A, B, std, y, mask)
            return torch.autograd.grad(loss, v)
    else:
        def fn():
            return fn_loss(v, *big[1:], A, B, std, y, mask)

    nbytes = loss_bytes(provider, N, C, D, big[0].element_size(), backward=mode == "fwd_bwd")
    benchmark.extra_info.update({"op": "stepnft_loss", "provider": provider, "mode": mode, "size": [N, C, D],
                                 "dtype": str(dtype)[6:]})
    _measure(benchmark, fn, device, nbytes, copy_bw, _rounds(device, N * C * D))


@pytest.mark.parametrize("size", SDE_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sde_step(benchmark, provider, size, device, full_sweep, copy_bw):
    if not full_sweep and size not in SDE_CPU:
        pytest.skip("not in the reduced CPU sweep (pass --kernel-sizes=full to run it)")
    N, H, D = size
    benchmark.group = f"sde_step {N}x{H}x{D} fp32"
    step = _impl(provider, device, "sde")
    g = torch.Generator(device=device).manual_seed(0)
    x, v = (torch.randn(N, H, D, device=device, generator=g) for _ in range(2))
    A, B, std = (torch.rand(N, device=device, generator=g) for _ in range(3))
    # dynamo does not trace torch.Generator arguments: the compiled step draws from the default generator
    gen = torch.Generator(device=device).manual_seed(1) if provider != "compile" else None

    def fn():
        return step(x, v, A, B, std, generator=gen)

    benchmark.extra_info.update({"op": "sde_step", "provider": provider, "mode": "fwd", "size": [N, H, D],
                                 "dtype": "float32"})
    _measure(benchmark, fn, device, sde_bytes(provider, N, H, D, 4), copy_bw, _rounds(device, N * H * D))
