"""DeepSpeed ZeRO actor engine: the optimiser side of the StepNFT update (DESIGN: "Actor update").

One :meth:`ActorEngine.train_step` = one ``engine.backward(loss); engine.step()`` = one AdamW step on the
caller's micro-batch (DeepSpeed's gradient accumulation is fixed at 1: the trainer does its own micro-batching).
Data parallel: each rank computes the loss on its own micro-batch; DeepSpeed averages gradients over ranks,
clips the global norm to ``train.grad_clip`` and steps AdamW (``train.lr``, ``betas``, ``eps``,
``weight_decay``) on the parameters with ``requires_grad`` only. ZeRO stage = ``engine.zero_stage`` (0-3).

Launch::

    python -m fastnft.train ...                                   # one process, gloo/nccl group of size 1
    deepspeed --num_gpus 2 --module fastnft.train ...             # N ranks (GPU)
    torchrun --nproc_per_node 2 -m fastnft.train ...              # N ranks (also CPU, gloo)

Checkpoints are portable single files: :meth:`ActorEngine.state_dict_for_checkpoint` gathers the full fp32
trainable weights and the full AdamW moments (``exp_avg``, ``exp_avg_sq``, keyed by parameter name) from the
ZeRO partitions, so a checkpoint written with ZeRO-2 on 2 ranks resumes under any stage and world size, and
:mod:`fastnft.engine.checkpoint` can write it atomically as ONE file (a DeepSpeed checkpoint directory holds one
file per rank, which makes an atomic "all or nothing" write and a world-size change much harder).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fastnft.config import EngineConfig, TrainConfig
from fastnft.devices import resolve_device
from fastnft.engine import dist as fdist

__all__ = ["ActorEngine", "build_ds_config"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def build_ds_config(train_cfg: TrainConfig, engine_cfg: EngineConfig, use_cuda: bool) -> dict[str, Any]:
    """DeepSpeed config dict for the actor; ``configs/deepspeed_zero2.json`` is this for the defaults, stage 2, CUDA.

    DeepSpeed derives ``train_batch_size = 1 * 1 * world_size`` (nominal: losses are computed by the trainer).
    DeepSpeed's own bf16/fp16 modes stay off for every ``engine.dtype``: bf16 is torch autocast inside the policy
    (:meth:`fastnft.policies.state_flow.StateFlowPolicy.set_precision`), so the optimizer, ZeRO partitions,
    EMA and checkpoints all hold the fp32 master weights themselves.
    """
    zero: dict[str, Any] = {"stage": engine_cfg.zero_stage}
    if engine_cfg.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=use_cuda, reduce_scatter=True)
    if engine_cfg.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=10_000, stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": 1,  # nominal: the trainer feeds its own micro-batches
        "gradient_accumulation_steps": 1,  # one backward+step pair = one optimizer step
        "gradient_clipping": float(train_cfg.grad_clip),
        "bf16": {"enabled": False},  # bf16 = autocast in the policy; the weights DeepSpeed sees are fp32 masters
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch.optim.AdamW: no 40 s fused-Adam op build
        "steps_per_print": 1_000_000_000,  # never: the trainer logs metrics itself
        "wall_clock_breakdown": False,
    }


def _z3_set_full(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """Write this rank's slice of a full fp32 ``value`` into a ZeRO-3 parameter's fp32 partition (``key=None``)
    or optimizer state ``key``.

    ``deepspeed.utils.safe_set_full_*`` cannot do it in deepspeed 0.19 when ``numel`` is not a multiple of the
    world size (it narrows past the end for the last, padded partition); here the value is zero-padded first.
    """
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n, r = part.numel(), opt._get_param_partition_rank(param)
    padded = torch.zeros(max(n * (r + 1), value.numel()), dtype=part.dtype, device=part.device)
    padded[: value.numel()] = value.flatten()
    part.copy_(padded[r * n:(r + 1) * n])


def _trainable_parts(module: nn.Module) -> list[nn.Module]:
    """The largest submodules of ``module`` whose parameters are all trainable, covering every trainable one.

    Raises:
        ValueError: a module holds trainable parameters directly (not in a submodule) next to frozen ones: they
            cannot be handed to DeepSpeed without the frozen ones.
    """
    params = list(module.parameters())
    if not any(p.requires_grad for p in params):
        return []
    if all(p.requires_grad for p in params):
        return [module]
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    if own:
        raise ValueError(f"ZeRO-3: {type(module).__name__} holds trainable parameters {own} next to frozen ones; "
                         "move them into a submodule, or use engine.zero_stage <= 2")
    parts: dict[int, nn.Module] = {}
    for child in module.children():
        for part in _trainable_parts(child):
            parts.setdefault(id(part), part)
    return list(parts.values())


class _TrainableView(nn.Module):
    """What DeepSpeed wraps under ZeRO-3 when the policy has frozen parameters: the trainable submodules only.

    ZeRO-3 partitions every parameter of the module it wraps, in place. pi0's frozen PaliGemma prefix is shared
    with the EMA rollout copy (``Pi0Model.__deepcopy__``, to hold it once), so partitioning it would leave the EMA
    copy's prefix as empty stubs; and partitioning frozen weights buys nothing (they have no gradient or optimizer
    state). The parts are the policy's own submodules, so DeepSpeed's fetch hooks fire when the policy calls them.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(_trainable_parts(module))

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("ActorEngine under ZeRO-3: call the policy (ActorEngine.module), not the DeepSpeed engine")


class ActorEngine:
    """A policy wrapped by ``deepspeed.initialize`` with torch AdamW and ZeRO stage ``engine_cfg.zero_stage``.

    Args:
        module: the live policy (full, on CPU or already on this rank's device). Only parameters with
            ``requires_grad`` are optimised. Under ZeRO-3 its trainable parameters become partitioned in place
            (build the :class:`~fastnft.engine.ema.EMA` before this engine); frozen ones stay whole and out of
            DeepSpeed (only the trainable submodules are wrapped).
        train_cfg: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``grad_clip``.
        engine_cfg: ``zero_stage``, ``dtype``.
        ds_overrides: optional entries merged (top level) into the DeepSpeed config.
        device: this rank's device (``fastnft.devices.resolve_device``); None = ``resolve_device("auto")``.
            ``cpu`` is honoured on a CUDA host.

    Attributes:
        engine: the ``deepspeed.DeepSpeedEngine``. module: the policy (call it / its methods directly).
        rank, world_size, is_main, device.

    Raises:
        ValueError: no trainable parameter.
        RuntimeError: DeepSpeed is set up for another accelerator than ``device`` (imported before this engine).
    """

    def __init__(self, module: nn.Module, train_cfg: TrainConfig, engine_cfg: EngineConfig,
                 ds_overrides: dict[str, Any] | None = None, device: torch.device | str | None = None) -> None:
        self.device = resolve_device("auto" if device is None else device)
        fdist.init_distributed(device=self.device)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        use_cuda = self.device.type == "cuda"
        accel = get_accelerator().device_name()
        if accel != self.device.type:
            raise RuntimeError(f"ActorEngine: DeepSpeed uses its {accel!r} accelerator but the device is "
                               f"{self.device}; set DS_ACCELERATOR={self.device.type} before anything imports "
                               "deepspeed (fastnft does it when the engine is built first)")
        self.zero_stage = engine_cfg.zero_stage
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("ActorEngine: the module has no parameter with requires_grad=True; nothing to train")
        module.to(self.device)
        self._module = module
        params = [p for p in module.parameters() if p.requires_grad]
        # ZeRO-3 with frozen parameters: only the trainable submodules go to DeepSpeed (see _TrainableView)
        wrapped = (_TrainableView(module) if self.zero_stage == 3 and len(params) < len(list(module.parameters()))
                   else module)
        optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps,
                                      weight_decay=train_cfg.weight_decay)
        self.ds_config = build_ds_config(train_cfg, engine_cfg, use_cuda)
        self.ds_config.update(ds_overrides or {})
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                                                 config=self.ds_config)

    # ------------------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The policy (the module passed in: same object and parameter names)."""
        return self._module

    @property
    def rank(self) -> int:
        return fdist.rank()

    @property
    def world_size(self) -> int:
        return fdist.world_size()

    @property
    def is_main(self) -> bool:
        return fdist.is_main()

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by :meth:`load_checkpoint_state`)."""
        return int(self.engine.global_steps)

    def _params(self) -> list[nn.Parameter]:
        named = dict(self.module.named_parameters())
        return [named[n] for n in self._names]

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch AdamW that holds the (possibly flat, partitioned) state."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def set_lr(self, lr: float) -> None:
        """Set the AdamW learning rate of every parameter group (warm-up schedules call it per iteration).

        Raises:
            ValueError: ``lr`` is negative or not finite.
        """
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"set_lr: learning rate must be a finite float >= 0, got {lr!r}")
        for g in self._base_optimizer().param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------------------------------------------
    def train_step(self, loss: torch.Tensor) -> dict[str, float]:
        """Backward ``loss`` (a scalar: the mean over this rank's micro-batch), average gradients over ranks,
        clip the global norm to ``grad_clip``, one AdamW step.

        Returns:
            ``{"grad_norm": global gradient norm before clipping (identical on all ranks), "lr": float}``.

        Raises:
            ValueError: ``loss`` is not a scalar.
        """
        if loss.dim() != 0:
            raise ValueError(f"train_step: loss must be a scalar, got shape {tuple(loss.shape)}; reduce it "
                             "(mean over this rank's micro-batch) first")
        self.engine.backward(loss)
        grad_norm = None
        if self.zero_stage == 0:  # plain torch optimizer: DeepSpeed does not record the norm
            grads = [p.grad for p in self._params() if p.grad is not None]
            grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                    for g in grads]))) if grads else 0.0
        self.engine.step()
        if grad_norm is None:
            g = self.engine.get_global_grad_norm()
            grad_norm = float(g) if g is not None else math.nan
        return {"grad_norm": grad_norm, "lr": float(self.engine.get_lr()[0])}

    # ------------------------------------------------------------------------------------------------------
    def _full_param(self, p: nn.Parameter) -> torch.Tensor:
        if self.zero_stage == 0:
            return p.detach().float()
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(p)

    def _full_moment(self, p: nn.Parameter, key: str) -> torch.Tensor | None:
        if self.zero_stage == 0:
            st = self._base_optimizer().state.get(p, {})
            return st[key].detach() if key in st else None
        from deepspeed.utils import safe_get_full_optimizer_state

        try:
            return safe_get_full_optimizer_state(p, key)
        except (ValueError, KeyError, AttributeError):  # no optimizer step yet: no state
            return None

    def _optimizer_step_count(self) -> int:
        for st in self._base_optimizer().state.values():
            if "step" in st:
                return int(st["step"])
        return 0

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        """Full (unpartitioned) trainable weights and AdamW state, as plain containers of CPU tensors.

        Collective: every rank must call it (ZeRO partitions are all-reduced); all ranks get the same dict,
        rank 0 writes it (:func:`fastnft.engine.checkpoint.save_checkpoint`).

        Returns:
            ``{"params": {name: fp32 tensor}, "optim": {"step": int, "exp_avg": {name: fp32},
            "exp_avg_sq": {name: fp32}}, "global_steps": int, "zero_stage": int, "world_size": int}``;
            the moments are empty dicts before the first step.
        """
        params, moments = {}, {k: {} for k in _MOMENTS}
        for n, p in zip(self._names, self._params()):
            params[n] = self._full_param(p).detach().cpu().clone()
            for k in _MOMENTS:
                m = self._full_moment(p, k)
                if m is not None:
                    moments[k][n] = m.detach().float().cpu().clone().reshape(params[n].shape)
        return {"params": params, "optim": {"step": self._optimizer_step_count(), **moments},
                "global_steps": self.global_steps, "zero_stage": self.zero_stage, "world_size": self.world_size}

    def _check_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "params" not in state or "optim" not in state:
            raise ValueError("load_checkpoint_state: expected the dict of state_dict_for_checkpoint() with keys "
                             "'params' and 'optim'; the checkpoint's 'actor' entry is what belongs here")
        saved = state["params"]
        missing = sorted(set(self._names) - set(saved))
        extra = sorted(set(saved) - set(self._names))
        if missing or extra:
            raise ValueError(f"load_checkpoint_state: trainable parameters differ from the checkpoint (missing "
                             f"{missing[:5]}, unexpected {extra[:5]}); resume with the config the checkpoint was "
                             "written with, or start a fresh run_dir")
        for n, p in zip(self._names, self._params()):
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(saved[n].shape) != shape:
                raise ValueError(f"load_checkpoint_state: '{n}' is {tuple(saved[n].shape)} in the checkpoint but "
                                 f"{shape} in the model; resume with the matching policy config or start a "
                                 "fresh run_dir")

    @torch.no_grad()
    def _init_optimizer_state(self) -> None:
        """Make AdamW create its (partitioned) state without changing weights: a zero-gradient step at lr 0."""
        opt = self._base_optimizer()
        lrs = [g["lr"] for g in opt.param_groups]
        wds = [g.get("weight_decay", 0.0) for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        from fastnft.engine.ema import _gathered

        params = self._params()
        with torch.enable_grad(), _gathered(params):  # ZeRO-3: grads must have the full parameter shape
            zero = sum((p * 0.0).sum() for p in params)
            self.engine.backward(zero)
        self.engine.step()
        for g, lr, wd in zip(opt.param_groups, lrs, wds):
            g["lr"], g["weight_decay"] = lr, wd

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict_for_checkpoint` output (any ZeRO stage / world size it was written with).

        Collective: every rank must call it with the same ``state``. Weights, AdamW moments and step count
        and the engine's step counter are restored; the next :meth:`train_step` continues the trajectory.

        Raises:
            ValueError: wrong structure, different trainable parameter names or shapes (named in the message).
        """
        self._check_state(state)
        optim = state["optim"]
        has_moments = all(len(optim.get(k, {})) == len(self._names) for k in _MOMENTS)
        if has_moments and not self._base_optimizer().state:
            self._init_optimizer_state()
        params = self._params()
        from fastnft.engine.ema import _gathered

        with _gathered(params, modifier_rank=0):  # ZeRO-3: write the full low-precision copy, re-partitioned
            for n, p in zip(self._names, params):
                p.copy_(state["params"][n].to(device=p.device, dtype=p.dtype))
        if self.zero_stage > 0:
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

            for n, p in zip(self._names, params):
                keys = (None, *_MOMENTS) if has_moments else (None,)
                for k in keys:
                    value = (state["params"][n] if k is None else optim[k][n]).to(self.device, torch.float32)
                    if self.zero_stage == 3:
                        _z3_set_full(p, value, k)
                    elif k is None:
                        safe_set_full_fp32_param(p, value)
                    else:
                        safe_set_full_optimizer_state(p, value, k)
        elif has_moments:
            opt_state = self._base_optimizer().state
            for n, p in zip(self._names, params):
                for k in _MOMENTS:
                    opt_state[p][k].copy_(optim[k][n].to(p.device, opt_state[p][k].dtype))
        if has_moments:
            for st in self._base_optimizer().state.values():
                if "step" in st:
                    st["step"] = torch.as_tensor(float(optim["step"]), dtype=st["step"].dtype,
                                                 device=st["step"].device) if torch.is_tensor(st["step"]) \
                        else int(optim["step"])
        self.engine.global_steps = int(state.get("global_steps", 0))
        self.engine.global_samples = self.engine.global_steps * self.engine.train_batch_size()
