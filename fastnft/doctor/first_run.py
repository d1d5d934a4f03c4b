"""Doctor rows for what broke the first GPU run on paper (issue 16): SFT on CUDA, pi0 attention on a flash-attn host
in fp32 and bf16, pi0 under ZeRO-3, the ManiSkill GPU seeding contract, and the driver / ptxas versions.

Each function is a check of :mod:`fastnft.doctor.checks` (returns a detail line, raises on failure, raises
``Skip`` when it cannot run here). All are bounded to well under a minute on one GPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from fastnft.doctor.common import Skip, need_cuda
from fastnft.envs.base import STATE_KEY, TASK_KEY, VectorEnv, image_key

__all__ = ["driver_and_ptxas", "maniskill_gpu_seeding", "pi0_attention_bf16", "pi0_attention_fp32", "pi0_zero3_cuda",
           "sft_cuda"]


def _need_cuda() -> torch.device:
    return need_cuda()


def driver_and_ptxas() -> str:
    """The NVIDIA driver (nvidia-smi, when present) and the ptxas Triton compiles kernels with (its bundled binary,
    or ``TRITON_PTXAS_PATH``): a cubin from a ptxas newer than the driver's CUDA version may fail to load."""
    parts = []
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=driver_version,name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        parts.append(f"driver {out.stdout.strip().splitlines()[0]}" if out.returncode == 0 and out.stdout.strip()
                     else f"nvidia-smi failed ({out.returncode})")
    else:
        parts.append("driver: no nvidia-smi on PATH")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        parts.append(f"GPU 0 sm_{major}{minor}, torch built for CUDA {torch.version.cuda}")
    parts.append(_ptxas_version())
    return "; ".join(parts)


def _ptxas_version() -> str:
    try:
        import triton
    except ImportError:
        return "ptxas: triton not installed"
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    env_ptxas = os.environ.get("TRITON_PTXAS_PATH")
    path = Path(env_ptxas) if env_ptxas else ptxas
    if not path.exists():
        return f"ptxas: not found at {path}"
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30, check=False)
    m = re.search(r"release ([0-9.]+), V([0-9.]+)", out.stdout)
    return f"ptxas {m.group(2) if m else out.stdout.strip()[-60:]} ({'TRITON_PTXAS_PATH' if env_ptxas else 'triton'})"


def sft_cuda() -> str:
    """A few SFT steps on CUDA (``fastnft sft`` / ``pipeline`` / ``grid`` start here): the generator lives on the
    GPU and the loss goes down from its first value."""
    dev = _need_cuda()
    from fastnft.config import PolicyConfig, SFTConfig
    from fastnft.envs.bandit import bandit_demo_dataset
    from fastnft.experiments.sft import build_policy, train_sft

    cfg = PolicyConfig(horizon=4, n_action_steps=4, width=32, depth=2, heads=2)
    data = bandit_demo_dataset(256, cfg.horizon, seed=0)
    policy = build_policy(data, cfg)
    losses = train_sft(policy, data, SFTConfig(steps=40, batch_size=64, lr=1e-3, num_demos=256), device=dev,
                       progress=False, log_every=10)
    if next(policy.parameters()).device != dev:
        raise AssertionError(f"the policy trained on {next(policy.parameters()).device}, not {dev}")
    if not losses[-1] < losses[0]:
        raise AssertionError(f"SFT loss did not fall in 40 steps: {losses}")
    return f"40 steps on {dev}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def _pi0_attention(precision: str) -> str:
    dev = _need_cuda()
    import fastnft.policies.attention as att
    from fastnft.policies.pi0 import Pi0Policy
    from fastnft.policies.pi0_config import Pi0Config

    vlm = "bfloat16" if precision == "bfloat16" else "float32"
    calls: list[torch.dtype] = []
    real = att._flash_varlen

    def counted():
        fn = real()

        def run(*a, **k):
            calls.append(a[0].dtype)
            return fn(*a, **k)
        return run

    pols = {}
    for backend in ("sdpa", "auto"):
        torch.manual_seed(0)
        pols[backend] = Pi0Policy(Pi0Config.tiny("pi0", attention=backend, vlm_dtype=vlm)).to(dev).eval()
        pols[backend].set_precision(precision)
    pols["auto"].load_state_dict(pols["sdpa"].state_dict())
    cfg = pols["sdpa"].cfg
    g = torch.Generator(device=dev).manual_seed(1)
    B, N, S, L = 3, len(cfg.cameras), cfg.vlm.image_size, cfg.tokenizer_max_length
    lang = torch.ones(B, L, dtype=torch.bool, device=dev)
    lang[1, 3:] = False
    inp = {"images": torch.rand(B, N, 3, S, S, device=dev, generator=g) * 2 - 1,
           "image_masks": torch.ones(B, N, dtype=torch.bool, device=dev),
           "lang_tokens": torch.randint(1, cfg.vlm.vocab_size, (B, L), device=dev, generator=g) * lang,
           "lang_masks": lang, "state": torch.randn(B, cfg.max_state_dim, device=dev, generator=g)}
    x = torch.randn(B, cfg.chunk_size, cfg.max_action_dim, device=dev, generator=g)
    t = torch.rand(B, device=dev, generator=g)
    with torch.no_grad():
        ref = pols["sdpa"].velocity(x, t, pols["sdpa"].encode(inp))
        att._flash_varlen = counted
        try:
            v = pols["auto"].velocity(x, t, pols["auto"].encode(inp))
        finally:
            att._flash_varlen = real
    tol = 1e-4 if precision == "float32" else 5e-2
    err = (v.float() - ref.float()).abs().max().item()
    if not torch.isfinite(v).all() or err > tol:
        raise AssertionError(f"attention auto differs from sdpa by {err:.3e} (tolerance {tol})")
    backend = att.resolve_backend("auto", dev)
    flash = f"{len(calls)} flash-attn calls ({', '.join(sorted({str(c) for c in calls})) or 'none'})"
    if precision == "float32" and calls:
        raise AssertionError(f"fp32 q/k/v reached flash-attn: {flash}")
    return f"attention auto -> {backend}: {flash}, max |v - v_sdpa| {err:.1e}"


def pi0_attention_fp32() -> str:
    """Tiny pi0 on CUDA, ``attention: auto``, fp32 everywhere (``engine.dtype: float32``): no fp32 call reaches
    flash-attn (which takes fp16/bf16 only), velocities equal SDPA's."""
    return _pi0_attention("float32")


def pi0_attention_bf16() -> str:
    """Tiny pi0 on CUDA, ``attention: auto``, bf16 prefix and bf16 expert: flash-attn takes the calls where
    installed, velocities equal SDPA's to bf16 precision."""
    return _pi0_attention("bfloat16")


def pi0_zero3_cuda() -> str:
    """Tiny pi0 under ``engine.zero_stage: 3`` on one GPU: one StepNFT iteration (EMA rollout, update, EMA update)
    on synthetic camera frames; the frozen prefix stays whole in the EMA copy."""
    dev = _need_cuda()
    from fastnft.config import load_config
    from fastnft.loop.trainer import StepNFTTrainer
    from fastnft.policies.factory import build_flow_policy

    repo_cfg = Path(__file__).resolve().parents[2] / "configs" / "pickcube_pi0_tiny.yaml"
    if not repo_cfg.exists():
        raise Skip(f"needs the repository's {repo_cfg.name} (run the doctor from a source checkout)")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(repo_cfg, [f"device={dev.type}", "engine.zero_stage=3", "env.cameras=[cam]", "env.num_envs=4",
                                     "train.episodes_per_iter=4", "train.eval_episodes=4", "env.max_episode_steps=8",
                                     f"run_dir={tmp}/run", "train.checkpoint_every=100"])
        env = _FrameEnv(4, dev)
        policy = build_flow_policy(cfg, init=None, state_dim=env.obs_dim, act_dim=env.act_dim, seed=0)
        frozen = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
        trainer = StepNFTTrainer(cfg, policy, env, progress=False)
        m = trainer.iteration(0)
        trainer.metrics.close()
        ema = dict(trainer.ema.module.named_parameters())
        bad = [n for n, t in frozen.items() if ema[n].shape != t.shape or not torch.equal(ema[n].cpu(), t.cpu())]
        if bad:
            raise AssertionError(f"ZeRO-3 changed the EMA copy's frozen prefix: {bad[:3]}")
    return f"1 iteration, loss {m['update/loss']:.4f}, {len(frozen)} frozen tensors whole in the EMA copy"


class _FrameEnv(VectorEnv):
    """Synthetic camera frames, a 3-wide state and an instruction on ``device`` (no simulator)."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.num_envs, self.obs_dim, self.act_dim, self.max_episode_steps = n, 3, 2, 8
        self.action_low, self.action_high = -torch.ones(2), torch.ones(2)
        self.g = torch.Generator(device=device).manual_seed(0)

    def _frame(self) -> dict:
        n, dev = self.num_envs, self.device
        return {image_key("cam"): torch.randint(0, 256, (n, 12, 10, 3), dtype=torch.uint8, device=dev, generator=self.g),
                STATE_KEY: torch.randn(n, 3, device=dev, generator=self.g), TASK_KEY: ["pick the cube"] * n}

    def _reset(self, seeds: list[int]) -> dict:
        return self._frame()

    def _step(self, actions: torch.Tensor):
        s = torch.rand(self.num_envs, device=self.device, generator=self.g) > 0.7
        return self._frame(), s.float(), s


def maniskill_gpu_seeding() -> str:
    """The ManiSkill GPU backend's seeding contract: ``reset([5, 5, 7, 7])`` gives equal rows pairwise (the group
    baseline and GRPO need it), on the first (reconfiguring) reset and a later one."""
    _need_cuda()
    from fastnft.config import EnvConfig
    from fastnft.envs.maniskill import ManiSkillVectorEnv, vulkan_available

    ok, why = vulkan_available()
    if not ok:
        raise Skip(why)
    env = ManiSkillVectorEnv(EnvConfig(sim_backend="gpu", max_episode_steps=20), num_envs=4)
    try:
        for k in range(2):
            obs = env.reset([5, 5, 7, 7]).float().cpu()
            same = (obs[0] - obs[1]).abs().max().item(), (obs[2] - obs[3]).abs().max().item()
            apart = (obs[0] - obs[2]).abs().max().item()
            if max(same) > 1e-5 or apart < 1e-3:
                raise AssertionError(f"reset {k}: equal seeds differ by {max(same):.2e} (want 0), different seeds "
                                     f"by {apart:.2e} (want > 0)")
    finally:
        env.close()
    return "equal seeds give equal initial states (2 resets); grouped baselines on gpu can be allowed"
