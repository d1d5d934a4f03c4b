"""Few-shot supervised flow-matching initialisation (SFT), and the SFT stage of the CLI commands.

:func:`run_sft_stage` trains (or reuses) the SFT policy file of a config, ``<data_dir>/sft/...pt``
(:func:`sft_checkpoint_path`), from the demonstrations of :mod:`fastnft.experiments.demos`.

Loss (SPEC notation): ``x_t = t eps + (1 - t) a``, target velocity ``u = eps - a``,
``L = mean over valid tokens and D of (v_theta(x_t, t, obs) - u)^2``; ``t`` drawn as in pi0
(``t = 0.999 * Beta(1.5, 1) + 0.001``, denser near the noise end).

    python -m fastnft.cli sft --config configs/pickcube_stepnft.yaml
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastnft.chunks import ChunkDataset, chunks_from_episodes
from fastnft.config import ConfigError, ExperimentConfig, PolicyConfig, SFTConfig, config_to_dict
from fastnft.devices import check_generator, make_generator, resolve_device
from fastnft.experiments.demos import demo_path, load_demo_episodes
from fastnft.policies.io import PolicyFileError, load_policy, save_policy
from fastnft.policies.normalizer import Normalizer
from fastnft.policies.state_flow import StateFlowPolicy

__all__ = ["build_policy", "flow_matching_loss", "run_sft_stage", "sft_checkpoint_path", "sft_key", "train_sft"]


def flow_matching_loss(policy: StateFlowPolicy, obs: Tensor, actions: Tensor, is_pad: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Conditional flow-matching loss on a batch (openpi convention, ``u = eps - a``).

    Args:
        policy: the flow policy.
        obs: ``[B, obs_dim]`` raw observations.
        actions: ``[B, H, act_dim]`` raw env actions.
        is_pad: ``[B, H]`` bool or None.
        generator: RNG for ``t`` and ``eps``; lives on the batch's device (``fastnft.devices.make_generator``).

    Returns:
        0-d float32 tensor.

    Raises:
        ValueError: ``generator`` lives on another device type than the batch (a CPU generator for CUDA draws).
    """
    a = policy.normalize_actions(actions)
    B = a.shape[0]
    dev = a.device
    check_generator(generator, dev, "flow-matching t and noise")
    # Beta(1.5, 1) by inversion (its CDF is x^1.5), so that t comes from ``generator`` too: torch's Beta sampler
    # draws from the global RNG, which made SFT depend on whatever ran before it in the process.
    u = torch.rand(B, generator=generator, device=dev)
    t = 0.999 * u.pow(1.0 / 1.5) + 0.001
    eps = torch.randn(a.shape, generator=generator, device=dev)
    x_t = t.view(B, 1, 1) * eps + (1 - t.view(B, 1, 1)) * a
    u = eps - a
    err = ((policy(x_t, t, obs) - u) ** 2)[..., : policy.act_dim].mean(-1)
    if is_pad is None:
        return err.mean()
    w = (~is_pad).float()
    return (err * w).sum() / w.sum().clamp(min=1.0)


def build_policy(data: ChunkDataset, cfg: PolicyConfig, seed: int = 0) -> StateFlowPolicy:
    """A fresh policy with observation/action normalisers fitted on ``data``.

    The initial weights come from ``seed`` alone (a forked global RNG), not from whatever state the process's
    global RNG is in: the same data, config and seed give the same initial policy in any process.
    """
    obs_norm = Normalizer.fit(data.obs)
    act_norm = Normalizer.fit(data.actions[~data.is_pad])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StateFlowPolicy(data.obs.shape[1], data.actions.shape[2], cfg, obs_norm, act_norm)


def train_sft(policy: StateFlowPolicy, data: ChunkDataset, cfg: SFTConfig, device: torch.device | str = "cpu",
              progress: bool = True, log_every: int = 500) -> list[float]:
    """Train ``policy`` in place with AdamW (cosine decay to 10 %) on ``data``.

    Returns:
        The running mean of the loss every ``log_every`` steps.
    """
    policy.to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(s / cfg.steps, 1.0))))
    # one generator on the training device for batch indices, t and noise (on CPU: the same draws as before)
    g = make_generator(device, cfg.seed)
    obs, act, pad = data.obs.to(device), data.actions.to(device), data.is_pad.to(device)
    M = len(data)
    history = []
    run = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: one host read per log line
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, M, (min(cfg.batch_size, M),), generator=g, device=device)
        loss = flow_matching_loss(policy, obs[idx], act[idx], pad[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        run += loss.detach()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            history.append(float(run) / n)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            run.zero_()
    policy.eval()
    return history


def sft_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the SFT result: task, control mode, demos, SFT and architecture settings.

    Cached SFT files store this key (``meta["key"]``) and are reused only while it is equal, so its values must not
    change with renames: ``policy.n_action_steps`` keeps its old name ``chunk`` here, which every SFT file written
    before the rename holds (renaming it would silently retrain and overwrite them). The pi0-only keys (``kind``,
    ``checkpoint``, ``pi0``) stay out: SFT trains only the state policy.
    """
    policy = {("chunk" if k == "n_action_steps" else k): v for k, v in config_to_dict(cfg.policy).items()
              if k not in ("kind", "checkpoint", "pi0")}
    return {"task": cfg.env.task, "control_mode": cfg.env.control_mode, "demos": config_to_dict(cfg.demos),
            "sft": config_to_dict(cfg.sft), "policy": policy}


def sft_checkpoint_path(cfg: ExperimentConfig) -> Path:
    """``<data_dir>/sft/<task>_<num_demos>demos_<steps>steps_s<seed>.pt`` (shared by runs with the same SFT)."""
    s = cfg.sft
    return Path(cfg.data_dir) / "sft" / f"{cfg.env.task}_{s.num_demos}demos_{s.steps}steps_s{s.seed}.pt"


def run_sft_stage(cfg: ExperimentConfig, *, force: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Train (or reuse) the few-shot SFT policy of ``cfg`` and return its file and meta.

    Reuses an existing file only when its ``meta["key"]`` equals :func:`sft_key` of ``cfg``.

    Raises:
        PolicyFileError / FileNotFoundError: no demonstrations (run `fastnft demos` first).
        ConfigError: ``policy.kind`` is not ``state_flow`` (SFT, and so ``pipeline`` and ``grid``, train the state
            policy; pi0 starts from its checkpoint).
    """
    if cfg.policy.kind != "state_flow":
        raise ConfigError(f"SFT trains the state policy, but policy.kind is {cfg.policy.kind!r}: pi0 starts from its "
                          "checkpoint (policy.checkpoint); run `fastnft train --config <yaml>` instead")
    out = sft_checkpoint_path(cfg)
    key = sft_key(cfg)
    if out.exists() and not force:
        try:
            _, meta = load_policy(out, cfg)
            if meta.get("key") == key:
                return out, meta
        except PolicyFileError:
            pass
    if cfg.env.task == "bandit":
        from fastnft.envs.bandit import bandit_demo_dataset

        data = bandit_demo_dataset(cfg.sft.num_demos, cfg.policy.horizon, seed=cfg.demos.seed)
    else:
        episodes = load_demo_episodes(cfg)
        if len(episodes) < cfg.sft.num_demos:
            raise PolicyFileError(f"sft.num_demos={cfg.sft.num_demos} but only {len(episodes)} demonstrations exist "
                                  f"in {demo_path(cfg)}; raise demos.num_demos and rerun `fastnft demos`")
        data = chunks_from_episodes(episodes[: cfg.sft.num_demos], cfg.policy.horizon)
    policy = build_policy(data, cfg.policy, seed=cfg.sft.seed)
    device = resolve_device(cfg.device)
    t0 = time.time()
    losses = train_sft(policy, data, cfg.sft, device=device, progress=progress)
    meta = {"key": key, "task": cfg.env.task, "sft_seconds": time.time() - t0, "loss_history": losses,
            "num_demos": cfg.sft.num_demos, "num_samples": len(data)}
    save_policy(out, policy.cpu(), meta)
    return out, meta
