"""Helpers of the kernel benchmarks: device copy bandwidth, CUDA-event timing, inputs, bytes models."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    try:
        import cpuinfo  # py-cpuinfo, a pytest-benchmark dependency

        brand = cpuinfo.get_cpu_info().get("brand_raw")
    except Exception:  # noqa: BLE001 - the name is cosmetic
        brand = None
    return f"{brand or platform.machine()} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_time_ms(fn: Callable[[], object], *, reps: int = 20, inner: int = 10) -> tuple[float, float, float]:
    """(median, q10, q90) milliseconds per call of ``fn`` by CUDA events; each rep times ``inner``
    back-to-back calls (so launch gaps count, as in training)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1]


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Measured device copy bandwidth in GB/s (1e9 B/s): ``dst.copy_(src)`` of a buffer much larger than the
    caches, counting the read and the write (2 x nbytes per copy); the median over ``reps``."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        med, _, _ = gpu_time_ms(lambda: dst.copy_(src), reps=reps, inner=3)
        seconds = med / 1e3
    else:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            dst.copy_(src)
            ts.append(time.perf_counter() - t0)
        seconds = statistics.median(ts)
    return 2 * nbytes / seconds / 1e9


def loss_inputs(N: int, C: int, D: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """A StepNFT micro-batch as the trainer builds it (S3): x_next from the Flow-SDE transition (S2)."""
    from fastnft.sde import flow_sde_schedule

    g = torch.Generator(device=device).manual_seed(seed)
    sch = flow_sde_schedule(4, 0.2).to(device=device, dtype=torch.float32)
    i = torch.randint(0, 4, (N,), device=device, generator=g)
    A, B, std = sch.A[i], sch.B[i], sch.std[i]
    x_t = torch.randn(N, C, D, device=device, generator=g)
    v_old = torch.randn(N, C, D, device=device, generator=g)
    x_next = A.view(-1, 1, 1) * x_t + B.view(-1, 1, 1) * v_old + std.view(-1, 1, 1) * torch.randn(
        N, C, D, device=device, generator=g)
    v_theta = v_old + 0.2 * torch.randn(N, C, D, device=device, generator=g)
    y = 2 * torch.randint(0, 2, (N,), device=device, generator=g).float() - 1
    mask = torch.rand(N, device=device, generator=g) < 0.9
    big = [u.to(dtype) for u in (v_theta, v_old, x_t, x_next)]
    return big, (A, B, std, y, mask)


def loss_bytes(provider: str, N: int, C: int, D: int, elt: int, backward: bool) -> int:
    """Bytes a provider must move for one loss call. Forward: read v_theta, v_old, x_t, x_next (4 NCD) and
    the per-sample A, B, std, y (float32) and mask. Forward+backward: ``triton`` also writes its per-token
    gradient in the forward and reads it back in the backward before writing dL/dv_theta (7 NCD in all);
    ``torch`` and ``compile`` are credited with the compulsory 5 NCD (4 reads + the gradient write), a lower
    bound of what they move, so their GB/s are upper bounds."""
    per_sample = N * (4 * 4 + 1)
    big = N * C * D * elt
    if not backward:
        return 4 * big + per_sample
    return (7 if provider == "triton" else 5) * big + per_sample


def sde_bytes(provider: str, N: int, H: int, D: int, elt: int) -> int:
    """Bytes of one Flow-SDE step: read x_t, v, write x_next (3 NHD); ``torch`` also writes z and reads it
    back (5 NHD), ``compile`` and ``triton`` draw z in registers. Plus the per-sample A, B, std (float32)."""
    big = N * H * D * elt
    return (5 if provider == "torch" else 3) * big + 3 * 4 * N
