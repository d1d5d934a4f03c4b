"""Policy files: single ``torch.save`` files written atomically, loaded with ``weights_only=True``.

A policy file holds ``{"policy": StateFlowPolicy.export(), "meta": {...}}`` (``meta``: what produced it, e.g. the
SFT stage's key and loss history). :func:`load_run_policy` rebuilds the EMA policy of a training run from its
initial policy file and its latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastnft.config import ExperimentConfig
from fastnft.policies.base import FlowPolicy
from fastnft.policies.state_flow import StateFlowPolicy

__all__ = ["PolicyFileError", "load_policy", "load_run_policy", "save_final_policy", "save_policy"]


class PolicyFileError(RuntimeError):
    """A policy file is missing, unreadable or does not fit the config; the message names the fix."""


def save_policy(path: str | Path, policy: StateFlowPolicy, meta: dict[str, Any]) -> Path:
    """Write ``{"policy": export, "meta": meta}`` atomically (:meth:`StateFlowPolicy.save`)."""
    return policy.save(path, meta)


def save_final_policy(policy: FlowPolicy, run_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write a trained policy into ``run_dir`` in its own persistent form and return the path: the state policy as
    ``policy_final.pt`` (:func:`save_policy`), pi0 / pi0.5 as the checkpoint directory ``policy_final/`` (openpi /
    lerobot layout, which lerobot and openpi load; ``meta`` is not stored there)."""
    d = Path(run_dir)
    if isinstance(policy, StateFlowPolicy):
        return save_policy(d / "policy_final.pt", policy, meta)
    return policy.save(d / "policy_final")


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


def load_run_policy(run_dir: str | Path, cfg: ExperimentConfig, init: str | Path) -> tuple[StateFlowPolicy, int]:
    """The EMA (rollout/deployed) policy of a training run's latest checkpoint.

    Starts from the run's initial policy file ``init`` (the file the run trained from, which carries the normalisers;
    usually :func:`fastnft.experiments.sft.sft_checkpoint_path` of ``cfg``) and loads the checkpoint's EMA weights into it.

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
    policy, _ = load_policy(init, cfg)
    params = state["ema"]["params"]
    missing = [n for n in params if n not in dict(policy.named_parameters())]
    if missing:
        raise PolicyFileError(f"checkpoint in {str(run_dir)!r} has parameters {missing[:3]} the policy lacks")
    policy.load_state_dict(params, strict=False)
    return policy, it
