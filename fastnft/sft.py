"""Few-shot supervised flow-matching initialisation (SFT).

Loss (SPEC notation): ``x_t = t eps + (1 - t) a``, target velocity ``u = eps - a``,
``L = mean over valid tokens and D of (v_theta(x_t, t, obs) - u)^2``; ``t`` drawn as in pi0
(``t = 0.999 * Beta(1.5, 1) + 0.001``, denser near the noise end).

    python -m fastnft.cli sft --config configs/pickcube_stepnft.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastnft.config import PolicyConfig, SFTConfig
from fastnft.policies.normalizer import Normalizer
from fastnft.policies.state_flow import StateFlowPolicy

__all__ = ["ChunkDataset", "build_policy", "chunks_from_episodes", "flow_matching_loss", "train_sft"]


@dataclass
class ChunkDataset:
    """Supervised pairs (observation, action chunk).

    Attributes:
        obs: ``[M, obs_dim]`` float32 raw observations.
        actions: ``[M, H, act_dim]`` float32 raw env actions starting at that observation.
        is_pad: ``[M, H]`` bool, True where the chunk ran past the episode end (padded with the last action,
            excluded from the loss).
    """

    obs: Tensor
    actions: Tensor
    is_pad: Tensor

    def __len__(self) -> int:
        return int(self.obs.shape[0])


def chunks_from_episodes(episodes: Sequence[tuple[np.ndarray, np.ndarray]], horizon: int) -> ChunkDataset:
    """One chunk per time step of every episode.

    Args:
        episodes: ``(obs [T+1 or T, obs_dim], actions [T, act_dim])`` per episode.
        horizon: H.

    Raises:
        ValueError: an episode with no actions, or observations shorter than the actions.
    """
    obs_l, act_l, pad_l = [], [], []
    for k, (obs, act) in enumerate(episodes):
        obs, act = np.asarray(obs, np.float32), np.asarray(act, np.float32)
        T = act.shape[0]
        if T == 0 or obs.shape[0] < T:
            raise ValueError(f"demo episode {k}: needs >= 1 action and one observation per action, "
                             f"got obs {obs.shape} actions {act.shape}")
        idx = np.arange(T)[:, None] + np.arange(horizon)[None, :]
        pad = idx >= T
        obs_l.append(obs[:T])
        act_l.append(act[np.minimum(idx, T - 1)])
        pad_l.append(pad)
    return ChunkDataset(obs=torch.from_numpy(np.concatenate(obs_l)), actions=torch.from_numpy(np.concatenate(act_l)),
                        is_pad=torch.from_numpy(np.concatenate(pad_l)))


def flow_matching_loss(policy: StateFlowPolicy, obs: Tensor, actions: Tensor, is_pad: Tensor | None = None,
                       generator: torch.Generator | None = None) -> Tensor:
    """Conditional flow-matching loss on a batch (openpi convention, ``u = eps - a``).

    Args:
        policy: the flow policy.
        obs: ``[B, obs_dim]`` raw observations.
        actions: ``[B, H, act_dim]`` raw env actions.
        is_pad: ``[B, H]`` bool or None.
        generator: RNG for ``t`` and ``eps`` (on the batch's device).

    Returns:
        0-d float32 tensor.
    """
    a = policy.normalize_actions(actions)
    B = a.shape[0]
    dev = a.device
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
    g = torch.Generator().manual_seed(cfg.seed)
    obs, act, pad = data.obs.to(device), data.actions.to(device), data.is_pad.to(device)
    M = len(data)
    history, run = [], 0.0
    bar = tqdm(range(cfg.steps), desc="sft", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, M, (min(cfg.batch_size, M),), generator=g).to(device)
        loss = flow_matching_loss(policy, obs[idx], act[idx], pad[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        run += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            history.append(run / n)
            bar.set_postfix(loss=f"{run / n:.4f}")
            run = 0.0
    policy.eval()
    return history
