"""Actor engine: DeepSpeed ZeRO wrapper, EMA rollout policy (SPEC S9), atomic checkpoints, distributed helpers.

    from fastnft.engine import ActorEngine, EMA, ema_decay, save_checkpoint, load_latest, config_fingerprint

``ActorEngine`` (and its DeepSpeed import) is loaded lazily so the EMA / checkpoint helpers stay cheap to import.
"""

from __future__ import annotations

from typing import Any

from fastnft.engine import dist
from fastnft.engine.checkpoint import (
    CheckpointError,
    config_fingerprint,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from fastnft.engine.ema import EMA, ema_decay

__all__ = [
    "EMA",
    "ActorEngine",
    "CheckpointError",
    "build_ds_config",
    "config_fingerprint",
    "dist",
    "ema_decay",
    "load_checkpoint",
    "load_latest",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in ("ActorEngine", "build_ds_config"):
        from fastnft.engine import zero

        return getattr(zero, name)
    raise AttributeError(f"module 'fastnft.engine' has no attribute {name!r}")
