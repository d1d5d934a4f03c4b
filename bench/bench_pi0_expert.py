"""Time the pi0 action expert's forward + backward at pi0 size in bf16 (the update's per-micro-batch work).

    python bench/bench_pi0_expert.py --batch 2 --json bench/pi0_expert_cpu.json            # CPU: a small batch
    python bench/bench_pi0_expert.py --batch 32 --json bench/pi0_expert_h100.json          # GPU: tokens/s

One step = ``v = velocity(x_t, t, ctx)`` over the cached prefix (P = 3 cameras x 256 + 48 prompt tokens), the
StepNFT-like scalar ``mean(v^2)``, and ``backward()`` into the expert's bf16 parameters. The prefix itself is not
timed (it runs without grad once per micro-batch; see bench/RESULTS.md for its memory). Tokens/s counts suffix
tokens (state + H action tokens) per second. Medians over ``--reps`` after ``--warmup`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _pi0_bench_model import expert_model, synthetic_context


def run(variant: str, batch: int, reps: int, warmup: int, device: str) -> dict:
    model, full = expert_model(variant, torch.bfloat16, device)
    model.train()
    ctx = synthetic_context(full, batch, torch.bfloat16, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, full.chunk_size, full.max_action_dim, generator=g, device=device)
    t = torch.rand(batch, generator=g, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        for p in trainable:
            p.grad = None
        model.velocity(x, t, ctx).square().mean().backward()
        if device != "cpu":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = batch * full.suffix_len
    return {
        "variant": variant, "device": device, "device_name": _device_name(device), "dtype": "bfloat16",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
        "suffix_tokens_per_sample": full.suffix_len, "prefix_tokens": full.prefix_len,
        "expert_params": sum(p.numel() for p in model.expert.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "attention": model._backend(torch.device(device)),
        "loadavg_1m_after": os.getloadavg()[0], "reps": reps, "warmup": warmup, "step_s_all": times, "step_s_median": med,
        "step_s_min": min(times), "tokens_per_s": tokens / med, "samples_per_s": batch / med,
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="pi0", choices=["pi0", "pi05"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    a = ap.parse_args()
    out = run(a.variant, a.batch, a.reps, a.warmup, a.device)
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
