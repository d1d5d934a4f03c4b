"""The checks of ``fastnft doctor`` (one function each; :mod:`fastnft.doctor` runs them and prints the table).

Each check returns a one-line detail string on success and raises on failure; a check that cannot run on this
machine raises :class:`Skip` with the reason. GPU checks skip without CUDA. Every check is bounded in time (tiny
configs, few iterations) so that the whole doctor stays within ten minutes on one GPU.

All but the two trivial checks run in a child process each (``python -m fastnft.doctor.checks NAME``): a
process holds one DeepSpeed accelerator and one process group for its lifetime, so a CPU check must not pin them
for the GPU checks after it; ``TRITON_INTERPRET`` must be set (or not) before the kernels are defined; and a
crashing CUDA check must not take the table down.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastnft.doctor.common import NO_CUDA, Skip, need_cuda

__all__ = ["CHECKS", "NO_CUDA", "UNCOVERED", "Check", "Skip"]

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "FASTNFT_SINGLE_PROCESS_PID")


class Check:
    """A named check: ``fn() -> detail``; ``gpu`` checks skip without CUDA; ``isolate`` runs it in a child process
    with ``env`` applied (a value of None removes the variable); ``timeout`` bounds the child in seconds."""

    def __init__(self, name: str, fn, gpu: bool, what: str, isolate: bool = True, env: dict | None = None,
                 timeout: float = 300.0) -> None:
        self.name, self.fn, self.gpu, self.what = name, fn, gpu, what
        self.isolate, self.env, self.timeout = isolate, env or {}, timeout


def _need_cuda(n: int = 1) -> torch.device:
    return need_cuda(n)


# -- always -----------------------------------------------------------------------------------------------------
def environment() -> str:
    """Versions and devices (never fails unless torch is broken)."""
    import deepspeed
    import triton

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return (f"torch {torch.__version__} (cuda {torch.version.cuda}), triton {triton.__version__}, deepspeed "
            f"{deepspeed.__version__}; GPUs: {', '.join(gpus) or 'none'}")


def spec_math() -> str:
    """SPEC S2 check values and S7's identity (E+ - E- = -4 beta B <r, dv_c> / var) in float64."""
    from fastnft.nft import VAR_EPS, stepnft_terms
    from fastnft.sde import flow_sde_schedule

    sch = flow_sde_schedule(4, 0.2)
    want = torch.tensor([[1, .4, .2, .98, -.25], [.75, .3464, .1732, .98, -.255], [.5, .2, .1, .99, -.255],
                         [.25, .1155, .0577, .99333, -.255]], dtype=torch.float64)
    got = torch.stack([sch.t[:4], sch.sigma, sch.std, sch.A, sch.B], 1)
    if not torch.allclose(got, want, atol=6e-5):
        raise AssertionError(f"S2 check values differ: got {got.tolist()}")
    g = torch.Generator().manual_seed(0)
    N, C, D = 37, 5, 7
    vt, vo, xt, xn = (torch.randn(N, C, D, generator=g, dtype=torch.float64) for _ in range(4))
    i = torch.randint(0, 4, (N,), generator=g)
    y = torch.ones(N, dtype=torch.float64)
    terms = stepnft_terms(vt, vo, xt, xn, sch.A[i], sch.B[i], sch.std[i], y, max_drift=0.5)
    B3, A3 = sch.B[i].view(-1, 1, 1), sch.A[i].view(-1, 1, 1)
    dv_c = (vt - vo) * terms.clip_scale.unsqueeze(-1)
    r = xn - (A3 * xt + B3 * vo)
    ident = -4 * B3.squeeze(-1) * (r * dv_c).sum(-1) / (sch.std[i].view(-1, 1) ** 2 + VAR_EPS)
    err = (terms.e_pos - terms.e_neg - ident).abs().max().item()
    if err > 1e-9:
        raise AssertionError(f"S7 identity off by {err:.3e}")
    return f"S2 check values and S7 identity hold (max error {err:.1e})"


def kernels_interpreted() -> str:
    """The fused kernels under the Triton interpreter on CPU (fp32, every S8 variant, strided, C = 1, D = 1)."""
    from fastnft.doctor.kernels import main

    return main("cpu")


def bandit_cpu() -> str:
    """One bandit iteration through the real trainer on CPU (DeepSpeed engine, reference kernels)."""
    m = _bandit(torch.device("cpu"), iterations=1)
    return f"1 iteration, loss {m[-1]['update/loss']:.4f}"


# -- GPU ---------------------------------------------------------------------------------------------------------
def kernels_cuda() -> str:
    """Compiled kernels vs the float64 reference: every S8 variant, fp32/bf16/fp16, strided, C = 1 and D = 1."""
    _need_cuda()
    from fastnft.doctor.kernels import main

    return main("cuda")


def sde_noise_cuda() -> str:
    """The fused SDE step's in-kernel noise: mean 0, variance 1, kurtosis 3, lanes uncorrelated."""
    dev = _need_cuda()
    from fastnft.kernels.sde_step import fused_sde_step

    n = 1 << 22
    x = torch.zeros(n // 256, 8, 32, device=dev)
    one = torch.ones((), device=dev)
    z = fused_sde_step(x, x, one, one, one, seed=torch.tensor([12345], device=dev)).double().flatten()
    m, var = z.mean().item(), z.var().item()
    kurt = ((z - m).pow(4).mean() / (z - m).pow(2).mean() ** 2).item()
    if abs(m) > 5 / math.sqrt(n) or abs(var - 1) > 5 * math.sqrt(2 / n) or abs(kurt - 3) > 0.05:
        raise AssertionError(f"noise statistics off: mean {m:.5f}, var {var:.5f}, kurtosis {kurt:.4f}")
    return f"{n} draws: mean {m:+.5f}, var {var:.5f}, kurtosis {kurt:.4f}"


def bandit_cuda_kernels_on() -> str:
    """3 bandit iterations on CUDA with the fused Triton kernels."""
    return _bandit_gpu("triton", "float32")


def bandit_cuda_kernels_off() -> str:
    """3 bandit iterations on CUDA with the PyTorch reference."""
    return _bandit_gpu("torch", "float32")


def bandit_cuda_bf16() -> str:
    """3 bandit iterations on CUDA with engine.dtype=bfloat16 (autocast policy, fp32 masters)."""
    return _bandit_gpu("auto", "bfloat16")


def cuda_graph() -> str:
    """The captured K-step sampler (policy + fused SDE step): a replay equals eager for the same generator state,
    two replays draw different noise, the captured region makes no host sync, and an in-place weight update
    (the EMA) is seen without recapture."""
    dev = _need_cuda()
    from fastnft.config import PolicyConfig
    from fastnft.devices import make_generator
    from fastnft.kernels import get_sde_step
    from fastnft.loop.graphs import GraphedSampler
    from fastnft.policies.state_flow import StateFlowPolicy
    from fastnft.sde import flow_sde_schedule

    torch.manual_seed(0)
    policy = StateFlowPolicy(42, 4, PolicyConfig()).to(dev).eval()
    sch, step = flow_sde_schedule(4, 0.2), get_sde_step("auto", dev)
    gen = make_generator(dev, 0)
    obs = torch.randn(64, 42, device=dev, generator=gen)
    idx = torch.randint(0, 4, (64,), device=dev, generator=gen)
    sampler = GraphedSampler(policy, "on")
    kw = {"stochastic": True, "generator": gen, "step_index": idx, "step_fn": step}

    def compare(tag: str) -> None:
        state = gen.get_state()
        torch.cuda.set_sync_debug_mode("error")  # any host sync in copy-in + replay raises
        try:
            graphed = {k: v.clone() for k, v in vars(sampler.sample(obs, sch, **kw)).items() if v is not None}
        finally:
            torch.cuda.set_sync_debug_mode("default")
        gen.set_state(state)
        eager = policy.sample(obs, sch, **kw)
        for k, v in graphed.items():
            if not torch.allclose(v.float(), getattr(eager, k).float(), rtol=1e-5, atol=1e-5):
                raise AssertionError(f"{tag}: replay differs from eager in {k} "
                                     f"(max {(v.float() - getattr(eager, k).float()).abs().max().item():.3e})")

    sampler.sample(obs, sch, **kw)  # capture (outside the sync check: capture itself may allocate/sync)
    compare("replay")
    a = sampler.sample(obs, sch, **kw).actions.clone()
    b = sampler.sample(obs, sch, **kw).actions.clone()
    if torch.equal(a, b):
        raise AssertionError("two replays drew the same noise: the generator is not registered with the graph")
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(0.9)  # in place, as the EMA update
    compare("after an in-place weight update")
    if sampler.captures != 1:
        raise AssertionError(f"{sampler.captures} captures for one shape")
    return "replay == eager, replays draw new noise, no host sync in replay, in-place EMA seen without recapture"


def maniskill_gpu() -> str:
    """ManiSkill3 PickCube-v1 on the PhysX-GPU backend: 2 training iterations, co-located on the GPU."""
    _need_cuda()
    from fastnft.envs.maniskill import vulkan_available

    ok, why = vulkan_available()
    if not ok:
        raise Skip(why)
    m = _pickcube_gpu(iterations=2)
    return f"2 iterations, {m[-1]['rollout/episodes']:.0f} episodes/iteration, {m[-1]['perf/env_steps_per_s']:.0f} " \
           "env steps/s"


def nccl_two_ranks() -> str:
    """2 ranks (torchrun, NCCL, ZeRO-2) train the bandit on CUDA for 2 iterations."""
    _need_cuda(2)
    with tempfile.TemporaryDirectory() as tmp:
        init = _bandit_init_file(Path(tmp))
        sets = []
        for kv in [*_bandit_overrides(Path(tmp) / "ddp", "cuda"), "engine.zero_stage=2", "train.iterations=2"]:
            sets += ["--set", kv]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "fastnft.train", "--no-progress", "--init", str(init),
               "--config", str(_bandit_yaml(Path(tmp))), *sets]
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
        if out.returncode != 0:
            raise AssertionError(f"torchrun failed: {out.stderr[-800:]}")
    return "2 ranks x 2 iterations (NCCL, ZeRO-2)"


def kernel_bench() -> str:
    """A short timing of fused vs eager (CUDA events): loss fwd+bwd at 2048x5x32, SDE step at 1024x8x32."""
    dev = _need_cuda()
    from fastnft.kernels import get_sde_step, get_stepnft_loss
    from fastnft.nft import stepnft_loss as ref_loss
    from fastnft.sde import sde_step as ref_step

    g = torch.Generator(device=dev).manual_seed(0)
    N, C, D = 2048, 5, 32
    vt, vo, xt, xn = (torch.randn(N, C, D, device=dev, generator=g) for _ in range(4))
    A, B, std, y = (torch.rand(N, device=dev, generator=g) for _ in range(4))

    def loss_run(fn):
        v = vt.clone().requires_grad_(True)
        fn(v, vo, xt, xn, A, B, std, y).backward()

    x, v = (torch.randn(1024, 8, 32, device=dev, generator=g) for _ in range(2))
    a, b, s = (torch.rand(1024, device=dev, generator=g) for _ in range(3))
    out = {}
    for name, fused, ref, run in [
            ("loss fwd+bwd", get_stepnft_loss("triton", dev), ref_loss, loss_run),
            ("sde step", get_sde_step("triton", dev), ref_step, lambda fn: fn(x, v, a, b, s, generator=g))]:
        out[name] = tuple(_cuda_ms(lambda f=f, run=run: run(f)) for f in (fused, ref))
    return "; ".join(f"{k}: fused {f:.3f} ms vs eager {e:.3f} ms ({e / f:.1f}x)" for k, (f, e) in out.items())


def _first_run(name: str):
    """A check of :mod:`fastnft.doctor.first_run`, imported when it runs."""
    def run() -> str:
        from fastnft.doctor import first_run

        return getattr(first_run, name)()
    run.__doc__ = f"fastnft.doctor.first_run.{name}"
    return run


def _pi0_graphs(name: str):
    """A check of :mod:`fastnft.doctor.pi0_graphs`, imported when it runs."""
    def run() -> str:
        from fastnft.doctor import pi0_graphs

        return getattr(pi0_graphs, name)()
    run.__doc__ = f"fastnft.doctor.pi0_graphs.{name}"
    return run


CHECKS = [
    Check("environment", environment, False, "versions and devices", isolate=False),
    Check("driver_and_ptxas", _first_run("driver_and_ptxas"), False,
          "NVIDIA driver (nvidia-smi) and the ptxas Triton compiles with (cubins from a ptxas newer than the "
          "driver's CUDA may not load)", isolate=False),
    Check("spec_math", spec_math, False, "SPEC S2 check values, S7 identity (float64)", isolate=False),
    Check("kernels_interpreted", kernels_interpreted, False, "fused kernels vs float64 reference, Triton interpreter",
          env={"TRITON_INTERPRET": "1"}),
    Check("bandit_cpu", bandit_cpu, False, "bandit, 1 iteration, CPU"),
    Check("kernels_cuda", kernels_cuda, True, "compiled kernels vs float64 reference, fp32/bf16/fp16, all S8",
          env={"TRITON_INTERPRET": None}),
    Check("sde_noise_cuda", sde_noise_cuda, True, "fused SDE step noise statistics"),
    Check("bandit_cuda_kernels_on", bandit_cuda_kernels_on, True, "bandit, 3 iterations, CUDA, fused kernels"),
    Check("bandit_cuda_kernels_off", bandit_cuda_kernels_off, True, "bandit, 3 iterations, CUDA, reference"),
    Check("bandit_cuda_bf16", bandit_cuda_bf16, True, "bandit, 3 iterations, CUDA, bf16"),
    Check("cuda_graph", cuda_graph, True, "CUDA-graph sampler vs eager"),
    Check("maniskill_gpu", maniskill_gpu, True, "ManiSkill PickCube-v1, GPU sim, 2 iterations"),
    Check("nccl_two_ranks", nccl_two_ranks, True, "2 ranks, NCCL, ZeRO-2 (>= 2 GPUs)"),
    Check("kernel_bench", kernel_bench, True, "short kernel benchmark", env={"TRITON_INTERPRET": None}),
    Check("sft_cuda", _first_run("sft_cuda"), True,
          "SFT, 40 steps on CUDA: generator on the GPU, loss falls (sft / pipeline / grid start here)"),
    Check("pi0_attention_fp32", _first_run("pi0_attention_fp32"), True,
          "tiny pi0, attention auto, fp32: no fp32 call reaches flash-attn, velocity equals SDPA's"),
    Check("pi0_attention_bf16", _first_run("pi0_attention_bf16"), True,
          "tiny pi0, attention auto, bf16: flash-attn where installed, velocity equals SDPA's (bf16 tolerance)"),
    Check("pi0_zero3", _first_run("pi0_zero3_cuda"), True,
          "tiny pi0, ZeRO-3, one GPU: 1 iteration (rollout, update, EMA); frozen prefix whole in the EMA copy"),
    Check("pi0_cuda_graph", _pi0_graphs("pi0_cuda_graph"), True,
          "pi0, 18+18 layers (tiny widths), K 10, batch 1: graphed == eager (fp32 1e-5, bf16 1e-2 relative), no "
          "host sync in replays, chunk latency eager vs graphed"),
    Check("maniskill_gpu_seeding", _first_run("maniskill_gpu_seeding"), True,
          "ManiSkill GPU scene: reset([5, 5, 7, 7]) gives equal rows pairwise (group baseline / GRPO need it)"),
]


UNCOVERED = [
    "pi0 / pi0.5 at full size (a real 3B checkpoint): memory, speed and flash-attn numerics at head dim 256",
    "pi0 on the ManiSkill GPU scene with GPU-rendered cameras (pi0 rows use synthetic frames)",
    "ZeRO-3 (and any ZeRO stage with pi0) across 2 or more GPUs; more than 2 ranks; multi-node",
    ("CUDA graphs with pi0 at full size (pi0_cuda_graph captures a real-depth, tiny-width pi0; the full-size chunk "
     "latency is bench/pi0_chunk_latency.py's, not a doctor row)"),
    "learning on a GPU: no row checks that success rises, only that the paths run and agree with references",
    "host syncs per pi0 policy call and per rollout round on a GPU (counted on CPU by the tests only)",
    "GPUs older than Ampere (sm_70 / sm_75): bf16 and flash-attn are refused there by config checks, never run",
    "kernel register use and spills on this GPU (the kernels rows check values and speed, not occupancy)",
]
"""What no row of the doctor covers (printed under the table and written to the JSON as ``unchecked``)."""


# -- helpers -----------------------------------------------------------------------------------------------------
def _cuda_ms(fn, reps: int = 20) -> float:
    fn()  # warm-up: JIT compilation happens here
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bandit_overrides(run_dir: Path, device: str) -> list[str]:
    return [f"run_dir={run_dir}", f"device={device}", "env.task=bandit", "env.max_episode_steps=4",
            "env.num_envs=64", "policy.horizon=4", "policy.n_action_steps=4", "policy.width=32", "policy.depth=2",
            "policy.heads=2", "nft.noise_level=0.3", "nft.max_drift=null", "train.episodes_per_iter=64",
            "train.update_epochs=1", "train.micro_batch=64", "train.lr=1e-3", "train.eval_every=0",
            "train.eval_episodes=64", "train.checkpoint_every=100", "train.iterations=3"]


def _bandit_yaml(tmp: Path) -> Path:
    p = tmp / "bandit.yaml"
    p.write_text("name: doctor_bandit\n")
    return p


def _bandit_policy(cfg):
    from fastnft.envs.bandit import bandit_demo_dataset
    from fastnft.experiments.sft import build_policy, train_sft

    data = bandit_demo_dataset(256, cfg.policy.horizon, seed=0)
    policy = build_policy(data, cfg.policy)
    train_sft(policy, data, cfg.sft, progress=False)
    return policy.cpu()


def _bandit_init_file(tmp: Path) -> Path:
    from fastnft.config import load_config
    from fastnft.policies.io import save_policy

    cfg = load_config(None, [*_bandit_overrides(tmp / "sft", "cpu"), "sft.steps=30", "sft.num_demos=256"])
    return save_policy(tmp / "init.pt", _bandit_policy(cfg), {"task": "bandit"})


def _bandit(device: torch.device, iterations: int, extra: list[str] | None = None) -> list[dict]:
    from fastnft.config import load_config
    from fastnft.envs import make_env
    from fastnft.loop.trainer import StepNFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [*_bandit_overrides(Path(tmp) / "run", device.type), "sft.steps=30",
                                 "sft.num_demos=256", *(extra or [])])
        env = make_env(cfg.env)
        try:
            trainer = StepNFTTrainer(cfg, _bandit_policy(cfg), env, progress=False)
            metrics = [trainer.iteration(i) for i in range(iterations)]
            trainer.metrics.close()
        finally:
            env.close()
    for m in metrics:
        bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v) and k != "update/grad_norm"]
        if bad:
            raise AssertionError(f"non-finite metrics: {bad}")
    return metrics


def _bandit_gpu(kernels: str, dtype: str) -> str:
    dev = _need_cuda()
    t0 = time.perf_counter()
    m = _bandit(dev, 3, [f"engine.kernels={kernels}", f"engine.dtype={dtype}"])
    return f"3 iterations in {time.perf_counter() - t0:.1f} s, loss {m[-1]['update/loss']:.4f}, " \
           f"rollout success {m[-1]['rollout/success_rate']:.2f}"


def _pickcube_gpu(iterations: int) -> list[dict]:
    from fastnft.config import load_config
    from fastnft.envs import make_env
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.state_flow import StateFlowPolicy

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"run_dir={tmp}/run", "device=cuda", "env.sim_backend=gpu", "env.num_envs=16",
                                 "env.max_episode_steps=50", "train.episodes_per_iter=16", "train.micro_batch=256",
                                 "train.eval_episodes=16", "train.checkpoint_every=100", "train.iterations=2"])
        env = make_env(cfg.env)
        try:
            policy = StateFlowPolicy(env.obs_dim, env.act_dim, cfg.policy)  # untrained: this checks the path
            trainer = StepNFTTrainer(cfg, policy, env, progress=False)
            metrics = [trainer.iteration(i) for i in range(iterations)]
            trainer.metrics.close()
        finally:
            env.close()
    return metrics


def run_in_child(check: Check, timeout: float | None = None) -> tuple[str, str]:
    """Run ``check`` in a fresh interpreter for at most ``timeout`` seconds (default ``check.timeout``); returns
    ``(status, detail)``."""
    timeout = check.timeout if timeout is None else timeout
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    for k, v in check.env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    try:
        out = subprocess.run([sys.executable, "-m", "fastnft.doctor.checks", check.name], capture_output=True,
                             text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return "fail", f"timed out after {timeout:.0f} s"
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return "fail", f"child exited with {out.returncode}: {(out.stdout[-300:] + out.stderr[-700:]).strip()}"
    res = json.loads(lines[-1])
    return res["status"], res["detail"]


def _child_main(name: str) -> None:
    import traceback

    check = next(c for c in CHECKS if c.name == name)
    try:
        status, detail = "pass", check.fn()
    except Skip as e:
        status, detail = "skipped", str(e)
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        last = traceback.extract_tb(e.__traceback__)[-1]
        status, detail = "fail", f"{type(e).__name__}: {str(e)[:600]} ({Path(last.filename).name}:{last.lineno})"
    print(json.dumps({"status": status, "detail": detail}), flush=True)


if __name__ == "__main__":
    _child_main(sys.argv[1])
