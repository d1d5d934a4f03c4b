"""Batched observations of any policy: a tensor (state policy) or a dict (pi0: frames, state, instruction).

Rollout buffers store one observation per policy call and index micro-batches out of them; these helpers do that
for both forms, so the buffer code need not know which policy it serves. In a dict, tensor values are batched along
dim 0, a list holds one entry per row (e.g. the instructions), and a lone string is shared by every row. A third
form is a per-call context object with ``index(rows)``, ``to(device)``, ``batch_size`` and a ``cat(parts)``
classmethod (pi0's :class:`~fastnft.policies.pi0.PrefixContext`, stored with ``prefix_mode: cached``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Obs", "obs_batch_size", "obs_cat", "obs_index", "obs_to"]

Obs = Tensor | dict[str, Any]


def obs_batch_size(obs: Obs) -> int:
    """Rows B of a batched observation.

    Raises:
        ValueError: a dict without any tensor or list value.
    """
    if isinstance(obs, Tensor):
        return int(obs.shape[0])
    if not isinstance(obs, dict):
        return int(obs.batch_size)
    for v in obs.values():
        if isinstance(v, Tensor):
            return int(v.shape[0])
        if isinstance(v, list):
            return len(v)
    raise ValueError(f"observation dict has no batched value (tensor or list); keys: {sorted(obs)}")


def obs_to(obs: Obs, device: torch.device | str) -> Obs:
    """Move every tensor to ``device`` (strings and lists unchanged)."""
    if isinstance(obs, Tensor):
        return obs.to(device)
    if not isinstance(obs, dict):
        return obs.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in obs.items()}


def obs_index(obs: Obs, rows: Tensor) -> Obs:
    """Rows ``rows`` (``[M]`` int64 or ``[B]`` bool) of every batched value; a shared string becomes a list."""
    if isinstance(obs, Tensor):
        return obs[rows]
    if not isinstance(obs, dict):
        return obs.index(rows)
    ids = None  # row numbers on the host: read (one host sync) only for list or string values
    out: dict[str, Any] = {}
    for k, v in obs.items():
        if isinstance(v, Tensor):
            out[k] = v[rows.to(v.device)]
            continue
        if ids is None and isinstance(v, (list, str)):
            ids = (rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows).tolist()
        if isinstance(v, list):
            out[k] = [v[i] for i in ids]
        elif isinstance(v, str):
            out[k] = [v] * len(ids)
        else:
            raise TypeError(f"observation value {k!r} of type {type(v).__name__} cannot be indexed by row")
    return out


def obs_cat(parts: list[Obs]) -> Obs:
    """Concatenate batched observations along the rows (the inverse of splitting with :func:`obs_index`).

    Raises:
        ValueError: no parts, or dicts with different keys.
    """
    if not parts:
        raise ValueError("obs_cat needs at least one observation batch")
    if isinstance(parts[0], Tensor):
        return torch.cat(parts)
    if not isinstance(parts[0], dict):
        return type(parts[0]).cat(parts)
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise ValueError(f"observation dicts have different keys: {[sorted(p) for p in parts]}")
    out: dict[str, Any] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        if isinstance(vals[0], Tensor):
            out[k] = torch.cat(vals)
        else:
            out[k] = [x for p, v in zip(parts, vals, strict=True)
                      for x in ([v] * obs_batch_size(p) if isinstance(v, str) else v)]
    return out
