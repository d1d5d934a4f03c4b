"""Building blocks shared by the CLI commands: device choice, policy files, the SFT stage and the demo data.

Policy files (SFT results) are single ``torch.save`` files written atomically; they hold
:meth:`StateFlowPolicy.export` plus ``meta`` (what produced them), and are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fastnft.atomic import torch_save_atomic
from fastnft.config import ExperimentConfig, config_to_dict
from fastnft.devices import resolve_device  # re-exported: the CLI commands resolve the device here
from fastnft.policies.state_flow import StateFlowPolicy

__all__ = [
    "PolicyFileError",
    "demo_path",
    "load_policy",
    "resolve_device",
    "run_sft_stage",
    "save_policy",
    "sft_checkpoint_path",
]


class PolicyFileError(RuntimeError):
    """A policy file is missing, unreadable or does not fit the config; the message names the fix."""


def save_policy(path: str | Path, policy: StateFlowPolicy, meta: dict[str, Any]) -> Path:
    """Write ``{"policy": export, "meta": meta}`` atomically (temp file in the same folder, fsync, rename)."""
    return torch_save_atomic(path, {"policy": policy.export(), "meta": meta})


def load_policy(path: str | Path, cfg: ExperimentConfig | None = None) -> tuple[StateFlowPolicy, dict[str, Any]]:
    """Load a policy file written by :func:`save_policy`, checking it against ``cfg``.

    Raises:
        PolicyFileError: missing/unreadable file, or the policy does not fit the config (architecture, task).
    """
    p = Path(path)
    if not p.is_file():
        raise PolicyFileError(f"policy file {str(p)!r} does not exist; run `fastnft sft --config <yaml>` first "
                              "(or pass the right --init path)")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PolicyFileError(f"policy file {str(p)!r} is unreadable or truncated ({type(e).__name__}: {e}); "
                              "delete it and rerun `fastnft sft`") from e
    if not isinstance(blob, dict) or "policy" not in blob:
        raise PolicyFileError(f"{str(p)!r} is not a fastnft policy file (no 'policy' entry); pass an SFT output")
    meta = blob.get("meta", {})
    if cfg is not None and meta.get("task") not in (None, cfg.env.task):
        raise PolicyFileError(f"policy file {str(p)!r} was trained on task {meta.get('task')!r} but the config's "
                              f"env.task is {cfg.env.task!r}; use a matching config or retrain SFT")
    try:
        policy = StateFlowPolicy.from_export(blob["policy"], cfg.policy if cfg is not None else None)
    except (ValueError, KeyError, RuntimeError) as e:
        raise PolicyFileError(f"policy file {str(p)!r} does not fit the config: {e}") from e
    return policy, meta


def sft_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the SFT result: task, control mode, demos, SFT and architecture settings."""
    return {"task": cfg.env.task, "control_mode": cfg.env.control_mode, "demos": config_to_dict(cfg.demos),
            "sft": config_to_dict(cfg.sft), "policy": config_to_dict(cfg.policy)}


def sft_checkpoint_path(cfg: ExperimentConfig) -> Path:
    """``<data_dir>/sft/<task>_<num_demos>demos_<steps>steps_s<seed>.pt`` (shared by runs with the same SFT)."""
    s = cfg.sft
    return Path(cfg.data_dir) / "sft" / f"{cfg.env.task}_{s.num_demos}demos_{s.steps}steps_s{s.seed}.pt"


def demo_path(cfg: ExperimentConfig) -> Path:
    """Folder of the demonstrations."""
    return Path(cfg.data_dir) / cfg.demos.path


def run_sft_stage(cfg: ExperimentConfig, *, force: bool = False, progress: bool = True) -> tuple[Path, dict]:
    """Train (or reuse) the few-shot SFT policy of ``cfg`` and return its file and meta.

    Reuses an existing file only when its ``meta["key"]`` equals :func:`sft_key` of ``cfg``.

    Raises:
        PolicyFileError / FileNotFoundError: no demonstrations (run `fastnft demos` first).
    """
    from fastnft.sft import build_policy, chunks_from_episodes, train_sft

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


def load_demo_episodes(cfg: ExperimentConfig) -> list[tuple[Any, Any]]:
    """``[(obs [T+1, obs_dim], actions [T, act_dim])]`` of the demonstrations of ``cfg``'s task.

    Raises:
        FileNotFoundError / ValueError from :func:`fastnft.demos.load_demos` with the fix in the message.
    """
    from fastnft.demos import demo_file, load_demos

    path = demo_file(demo_path(cfg), cfg.env.task, cfg.env.control_mode)
    ds = load_demos(path, env_id=cfg.env.task, control_mode=cfg.env.control_mode)
    return [(ep.obs, ep.actions) for ep in ds.episodes]


def load_run_policy(run_dir: str | Path, cfg: ExperimentConfig,
                    init: str | Path | None = None) -> tuple[StateFlowPolicy, int]:
    """The EMA (rollout/deployed) policy of a training run's latest checkpoint.

    Starts from the run's initial policy file (``init``, default the config's SFT output, which carries the
    normalisers) and loads the checkpoint's EMA weights into it.

    Returns:
        ``(policy, iteration)``.

    Raises:
        PolicyFileError: no checkpoint in ``run_dir``, or the initial policy file is missing.
        fastnft.engine.CheckpointError: the checkpoint was written for another config.
    """
    from fastnft.engine import config_fingerprint, load_latest

    found = load_latest(run_dir, fingerprint=config_fingerprint(cfg), required_keys=("ema",))
    if found is None:
        raise PolicyFileError(f"no checkpoint in {str(run_dir)!r}; train first (`fastnft train`) or pass --policy")
    it, state = found
    policy, _ = load_policy(init or sft_checkpoint_path(cfg), cfg)
    params = state["ema"]["params"]
    missing = [n for n in params if n not in dict(policy.named_parameters())]
    if missing:
        raise PolicyFileError(f"checkpoint in {str(run_dir)!r} has parameters {missing[:3]} the policy lacks")
    policy.load_state_dict(params, strict=False)
    return policy, it
