"""EMA rollout policy (SPEC S9).

After each iteration's updates the trainer does::

    ema.update(actor.module, ema_decay(it, T, cfg.train.ema_start, cfg.train.ema_end))
    rollout(ema.module, ...)        # rollouts and evaluation use theta_ema

:class:`EMA` owns a deep copy of the policy (the *rollout policy*: eval mode, no gradients) and averages only
the parameters that are trainable in the live module (the action expert and its projections); frozen
parameters and buffers are copied once at construction and never averaged.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["EMA", "ema_decay"]


def ema_decay(iteration: int, total: int, start: float = 0.1, end: float = 0.995) -> float:
    """EMA decay of SPEC S9: cosine ramp from ``start`` (iteration 0) to ``end`` (iteration ``total`` and later).

    ``p = clip(iteration / total, 0, 1)``; ``decay = end - (end - start) * 0.5 * (1 + cos(pi * p))``.

    Args:
        iteration: training iteration (0-based; negative values clip to ``start``).
        total: T of the schedule (``train.ema_horizon`` or ``train.iterations``), >= 1.
        start, end: decays at p = 0 and p = 1, each in [0, 1].

    Raises:
        ValueError: ``total < 1`` or a decay outside [0, 1].
    """
    if total < 1:
        raise ValueError(f"ema_decay: total={total} must be >= 1 (set train.ema_horizon >= 1 or 0 = iterations)")
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        raise ValueError(f"ema_decay: start={start} and end={end} must lie in [0, 1] (train.ema_start/ema_end)")
    p = min(max(iteration / total, 0.0), 1.0)
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * p))


def _is_zero3(params: list[nn.Parameter]) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


@contextlib.contextmanager
def _gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Gather ZeRO-3 partitioned ``params`` to full tensors on every rank (no-op for ordinary parameters)."""
    if _is_zero3(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


class EMA:
    """Exponential moving average of a module's trainable parameters, held in a separate rollout copy.

    ``theta_ema <- decay * theta_ema + (1 - decay) * theta`` (S9), in place with ``torch._foreach_lerp_``.
    Averaged tensors keep the EMA copy's dtype (the live module's dtype at construction, float32 for the
    default config); live tensors of another dtype (bf16 training) are cast before averaging.

    Args:
        module: the live policy, full (not ZeRO-3 partitioned): build the EMA before :class:`ActorEngine`.
            Parameters with ``requires_grad=True`` at this moment are the averaged set.

    Attributes:
        module: the rollout policy (a deep copy; eval mode, ``requires_grad=False`` everywhere).
        names: names (``named_parameters``) of the averaged parameters.
        num_updates: number of :meth:`update` calls so far (saved in the state dict).

    Raises:
        ValueError: the module has no trainable parameter, or its parameters are already ZeRO-3 partitioned.
    """

    def __init__(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        if _is_zero3(list(params.values())):
            raise ValueError("EMA(module): the module's parameters are already ZeRO-3 partitioned; build the EMA "
                             "from the full module before creating the ActorEngine (deepspeed.initialize)")
        self.names: list[str] = [n for n, p in params.items() if p.requires_grad]
        if not self.names:
            raise ValueError("EMA(module): the module has no parameter with requires_grad=True; unfreeze the "
                             "action expert before building the EMA")
        self.module: nn.Module = copy.deepcopy(module).eval().requires_grad_(False)
        ema_params = dict(self.module.named_parameters())
        self._ema: list[torch.Tensor] = [ema_params[n] for n in self.names]
        self.num_updates = 0

    @staticmethod
    def _live(module: nn.Module, names: list[str]) -> list[nn.Parameter]:
        params = dict(module.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise KeyError(f"EMA: the module lacks parameters {missing[:5]}; pass the same policy the EMA was "
                           "built from (for an ActorEngine, its .module)")
        return [params[n] for n in names]

    @torch.no_grad()
    def update(self, module: nn.Module, decay: float) -> None:
        """One S9 step: ``theta_ema = decay * theta_ema + (1 - decay) * theta`` for the trainable parameters.

        Collective under ZeRO-3 (all ranks must call it): the partitioned live parameters are gathered so
        every rank's EMA copy is full and identical.

        Args:
            module: the live policy (``ActorEngine.module``), same parameter names as at construction.
            decay: in [0, 1]; 0 copies the live weights, 1 leaves the EMA unchanged.

        Raises:
            ValueError: decay outside [0, 1]. KeyError: a parameter name is missing.
        """
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA.update: decay={decay} must lie in [0, 1]; compute it with ema_decay()")
        live = self._live(module, self.names)
        with _gathered(live):
            src = [p.detach().to(device=e.device, dtype=e.dtype) for p, e in zip(live, self._ema)]
            torch._foreach_lerp_(self._ema, src, 1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the EMA weights into ``module``'s averaged parameters (collective under ZeRO-3)."""
        live = self._live(module, self.names)
        with _gathered(live, modifier_rank=0):
            for p, e in zip(live, self._ema):
                p.copy_(e.to(device=p.device, dtype=p.dtype))

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into ``module`` (restored on exit, also on error).

        Use :attr:`module` directly where possible; this exists for code that must run a specific instance.
        """
        live = self._live(module, self.names)
        with _gathered(live):
            backup = [p.detach().clone() for p in live]
        self.copy_to(module)
        try:
            yield module
        finally:
            with torch.no_grad(), _gathered(live, modifier_rank=0):
                for p, b in zip(live, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        """``{"params": {name: tensor (cpu copy)}, "num_updates": int}`` - plain containers (weights_only-safe)."""
        return {"params": {n: e.detach().cpu().clone() for n, e in zip(self.names, self._ema)},
                "num_updates": int(self.num_updates)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output.

        Raises:
            ValueError: missing/extra parameter names or a shape mismatch (named), i.e. a checkpoint of a
                different policy config; resume with the matching config or start a fresh run_dir.
        """
        params = state.get("params") if isinstance(state, dict) else None
        if not isinstance(params, dict):
            raise TypeError("EMA.load_state_dict: expected a dict with a 'params' mapping (EMA.state_dict output)")
        missing = sorted(set(self.names) - set(params))
        extra = sorted(set(params) - set(self.names))
        if missing or extra:
            raise ValueError(f"EMA.load_state_dict: parameter names differ (missing {missing[:5]}, unexpected "
                             f"{extra[:5]}); the checkpoint is of another policy - use the matching config")
        for n, e in zip(self.names, self._ema):
            if tuple(params[n].shape) != tuple(e.shape):
                raise ValueError(f"EMA.load_state_dict: '{n}' has shape {tuple(params[n].shape)} in the checkpoint "
                                 f"but {tuple(e.shape)} in the model; use the config the checkpoint was written with")
        for n, e in zip(self.names, self._ema):
            e.copy_(params[n].to(device=e.device, dtype=e.dtype))
        self.num_updates = int(state.get("num_updates", 0))
