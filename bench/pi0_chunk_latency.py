"""pi0 / pi0.5 action-chunk latency: eager vs CUDA-graphed vs ``torch.compile`` (pytest-benchmark), batch 1 and 64,
K = 10 Flow-SDE steps, one JSON per run with every mode's ratio to eager in the same run.

    pytest bench/pi0_chunk_latency.py --benchmark-json=/tmp/bm.json                # GPU: full size, bf16
    pytest bench/pi0_chunk_latency.py -k tiny                                      # CPU: the CI smoke test

One chunk = one policy call from processed inputs (tokenised prompt, frames): the prefix encode (SigLIP + the
PaliGemma language model's keys / values into the static prefix buffers) and the K-step sampler (K expert velocity
calls + SDE steps). Modes:

- ``eager``: ``Pi0Policy.sample``;
- ``graphed``: :class:`fastnft.loop.graphs.GraphedSampler` (``rollout.cuda_graphs: on``): the encode graph and the
  K-step loop graph, replayed after the host-side copy-in;
- ``compile``: ``torch.compile(Pi0Policy.sample, dynamic=False)`` with pre-drawn noise (nothing drawn from a
  generator); on CPU the backend is ``eager`` (Dynamo's tracing only: a smoke test, not a speed number).

Sizes: ``full`` = openpi's pi0 / pi0.5 (three cameras, 48-token prompt), random weights, prefix bf16 and expert
under bf16 autocast (the rollout's precision); needs a CUDA GPU (skipped elsewhere, with the reason). ``tiny`` =
``Pi0Config.tiny`` in fp32 (any device): its numbers only show that every mode runs.
The JSON (``bench/pi0_chunk_latency_cuda.json`` on a GPU, ``$FASTNFT_BENCH_JSON`` if set; none from a CPU run
unless asked) keys every median by (variant, size, batch, mode) and gives
``speedup_vs_eager``; the targets of the issue (pi0, batch 1, bf16 on an H100: <= 20 ms and >= 3x eager) are in
``targets`` and are checked by a reader of the JSON, never asserted here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fastnft.loop.graphs import GraphedSampler
from fastnft.policies.pi0 import Pi0Policy
from fastnft.policies.pi0_config import Pi0Config
from fastnft.sde import flow_sde_schedule

K = 10
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
TARGETS = {"pi0_full_b1_graphed_ms_h100": 20.0, "pi0_full_b1_graphed_speedup_vs_eager": 3.0}
_RESULTS: dict[str, dict] = {}
_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _config(variant: str, size: str) -> Pi0Config:
    if size == "tiny":
        return Pi0Config.tiny(variant, num_steps=K)
    base = Pi0Config.pi0 if variant == "pi0" else Pi0Config.pi05
    return base(cameras=CAMERAS, num_steps=K, vlm_dtype="bfloat16", attention="auto")


_POLICIES: dict[tuple, Pi0Policy] = {}


def _policy(variant: str, size: str) -> Pi0Policy:
    key = (variant, size)
    if key not in _POLICIES:
        _POLICIES.clear()  # one full-size model in memory at a time
        torch.manual_seed(0)
        with torch.device(_DEVICE):
            pol = Pi0Policy(_config(variant, size)).eval()
        pol.set_precision("bfloat16" if size == "full" else "float32")
        _POLICIES[key] = pol
    return _POLICIES[key]


def _inputs(cfg: Pi0Config, B: int) -> dict:
    g = torch.Generator(device=_DEVICE).manual_seed(0)
    N, S, L = len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    lang = torch.arange(L, device=_DEVICE)[None] < torch.randint(L // 2, L + 1, (B, 1), device=_DEVICE, generator=g)
    return {"images": torch.rand(B, N, 3, S, S, device=_DEVICE, generator=g) * 2 - 1,
            "image_masks": torch.ones(B, N, dtype=torch.bool, device=_DEVICE),
            "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L), device=_DEVICE, generator=g) * lang,
            "lang_masks": lang, "state": torch.randn(B, cfg.max_state_dim, device=_DEVICE, generator=g)}


def _chunk_fn(pol: Pi0Policy, mode: str, inputs: dict):
    sch = flow_sde_schedule(K, 0.2)
    gen = torch.Generator(device=_DEVICE).manual_seed(1)
    if mode == "eager":
        return lambda: pol.sample(inputs, sch, stochastic=True, generator=gen)
    if mode == "graphed":
        sampler = GraphedSampler(pol, "on")
        return lambda: sampler.sample(inputs, sch, stochastic=True, generator=gen)
    B = inputs["state"].shape[0]
    noise = torch.randn(B, K + 1, pol.H, pol.D, device=_DEVICE, generator=gen)
    step = torch.randint(0, K, (B,), device=_DEVICE, generator=gen)
    fn = torch.compile(lambda x, n, s: pol.sample(x, sch, stochastic=True, noise=n, step_index=s).actions,
                       dynamic=False, backend="inductor" if _DEVICE.type == "cuda" else "eager")
    return lambda: fn(inputs, noise, step)


@pytest.mark.parametrize("mode", ["eager", "graphed", "compile"])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_chunk_latency(benchmark, variant, size, batch, mode):
    if size == "full" and _DEVICE.type != "cuda":
        pytest.skip("full-size pi0 chunk latency needs a CUDA GPU (3B prefix; graphs are CUDA's): not run on CPU")
    if mode == "graphed" and _DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA GPU; on CPU the graphed sampler is the eager one (tests/test_pi0_graphs.py "
                    "checks its capture logic with a CPU stand-in)")
    pol = _policy(variant, size)
    fn = _chunk_fn(pol, mode, _inputs(pol.cfg, batch))

    def call():
        fn()
        if _DEVICE.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        rounds = 20 if _DEVICE.type == "cuda" else 3
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=3 if mode != "eager" else 1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the calls ran once, nothing was timed
        return
    med_ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update({"variant": variant, "size": size, "batch": batch, "mode": mode, "K": K,
                                 "median_ms": med_ms})
    _RESULTS[f"{variant}/{size}/b{batch}/{mode}"] = {"median_ms": med_ms, "variant": variant, "size": size,
                                                     "batch": batch, "mode": mode}


@pytest.fixture(scope="module", autouse=True)
def _write_json():
    yield
    target = os.environ.get("FASTNFT_BENCH_JSON")
    if not _RESULTS or (target is None and _DEVICE.type != "cuda"):  # the CPU smoke test writes no JSON by default
        return
    for key, r in _RESULTS.items():
        eager = _RESULTS.get(key.rsplit("/", 1)[0] + "/eager")
        r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
    dev = _DEVICE.type
    name = torch.cuda.get_device_name(_DEVICE) if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    out = {"device": name, "torch": torch.__version__, "K": K, "targets": TARGETS,
           "loadavg_1m_after": os.getloadavg()[0], "results": _RESULTS,
           "note": "tiny sizes are smoke tests, not speed numbers; full sizes are random-weight pi0 / pi0.5 in bf16"}
    path = Path(target or Path(__file__).with_name(f"pi0_chunk_latency_{dev}.json"))
    path.write_text(json.dumps(out, indent=2) + "\n")
