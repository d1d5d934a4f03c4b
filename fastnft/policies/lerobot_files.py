"""lerobot 0.4.x's policy files: config.json and the processor pipelines with their normaliser state; no lerobot
import (it pins an older torch), the format is written and read by hand.

What lerobot 0.4.x writes next to ``model.safetensors`` (``PreTrainedConfig._save_pretrained`` and
``DataProcessorPipeline._save_pretrained``), and what this module writes and reads:

=====================================================================  ===========================================
file                                                                   content
=====================================================================  ===========================================
``config.json``                                                        every ``PI0Config`` / ``PI05Config`` field,
                                                                       ``type: pi0 | pi05`` (draccus; unknown keys
                                                                       are an error)
``policy_preprocessor.json``                                           ``{"name": "policy_preprocessor", "steps":
                                                                       [{"registry_name", "config", "state_file"?}]}``
``policy_preprocessor_step_<i>_normalizer_processor.safetensors``      the normaliser's statistics
``policy_postprocessor.json``                                          ``unnormalizer_processor`` + ``device_processor``
``policy_postprocessor_step_0_unnormalizer_processor.safetensors``     the unnormaliser's statistics
=====================================================================  ===========================================

Statistic names are lerobot's: ``<feature>.<stat>``, e.g. ``observation.state.mean``, ``action.q99``, each a
float32 ``[dim]`` tensor (lerobot's ``_NormalizationMixin.state_dict``). The normaliser config holds ``eps``,
``features`` (``{key: {"type": "STATE", "shape": [8]}}``) and ``norm_map`` (``{"STATE": "MEAN_STD", ...}``).

lerobot 0.3.x kept the statistics inside ``model.safetensors`` as buffers
(``normalize_inputs.buffer_observation_state.mean``, ``unnormalize_outputs.buffer_action.std``);
:func:`read_lerobot03_buffers` reads those.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastnft.atomic import atomic_write
from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, NormStats

__all__ = [
    "ACTION_KEY",
    "LEROBOT_EPS",
    "POSTPROCESSOR",
    "PREPROCESSOR",
    "FoundStats",
    "StatisticsError",
    "lerobot_config",
    "mode_from_mapping",
    "read_lerobot03_buffers",
    "read_lerobot_processor",
    "write_lerobot_processor",
]

ACTION_KEY = "action"
PREPROCESSOR, POSTPROCESSOR = "policy_preprocessor.json", "policy_postprocessor.json"
LEROBOT_EPS = 1e-8  # lerobot's _NormalizationMixin.eps default
PALIGEMMA_TOKENIZER = "google/paligemma-3b-pt-224"  # what lerobot's pi0 / pi0.5 processors name
_TO_LEROBOT = {"mean_std": "MEAN_STD", "quantile": "QUANTILES", "identity": "IDENTITY"}
_FROM_LEROBOT = {v: k for k, v in _TO_LEROBOT.items()}


class StatisticsError(ValueError):
    """Normalisation statistics are missing, ambiguous or unreadable; the message names the file to add or fix."""


@dataclass
class FoundStats:
    """Statistics read from a checkpoint directory.

    Attributes:
        mode: the normalisation the files prescribe (``mean_std`` / ``quantile`` / ``identity``), None = not said.
        state, action: per-feature statistics, float32 ``[dim]`` each (those present in the files).
        convention: whose formulas apply, ``lerobot`` or ``openpi`` (they differ in the epsilon; see
            :meth:`fastnft.policies.processor.NormStats.normalize`).
        eps: the epsilon of that convention.
        source: the file(s) read, for messages.
    """

    mode: str | None
    state: NormStats
    action: NormStats
    convention: str
    eps: float
    source: str


# -- config.json -------------------------------------------------------------------------------------------------
def lerobot_config(cfg: Pi0Config, norm_mode: str) -> dict[str, Any]:
    """config.json as lerobot 0.4.x's ``PI0Config`` / ``PI05Config`` reads it.

    Holds every field that all lerobot 0.4.0 - 0.4.4 releases have (draccus rejects unknown keys, and 0.4.0 lacks
    ``rtc_config``, ``use_peft``, ``freeze_vision_encoder``, ``train_expert_only``, which then take their defaults).
    Training-only fields (optimizer, scheduler, time sampling) hold lerobot's defaults; fastnft's full architecture
    goes to ``fastnft_config.json``. ``paligemma_variant`` / ``action_expert_variant`` are the only sizes lerobot
    builds (``gemma_2b`` / ``gemma_300m``); a model of other sizes is not loadable by lerobot.

    Args:
        cfg: the policy config.
        norm_mode: ``mean_std`` | ``quantile`` | ``identity`` for the state and the action.

    Returns:
        A JSON-ready dict.
    """
    S = cfg.vlm.image_size
    norm = _TO_LEROBOT[norm_mode]
    return {
        "type": cfg.variant,
        # PreTrainedConfig (lerobot/configs/policies.py)
        "n_obs_steps": 1,
        "input_features": {**{f"observation.images.{c}": {"type": "VISUAL", "shape": [3, S, S]} for c in cfg.cameras},
                           STATE_KEY: {"type": "STATE", "shape": [cfg.state_dim]}},
        "output_features": {ACTION_KEY: {"type": "ACTION", "shape": [cfg.action_dim]}},
        "device": None, "use_amp": False, "push_to_hub": False, "repo_id": None, "private": None, "tags": None,
        "license": None, "pretrained_path": None,
        # PI0Config / PI05Config
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m", "dtype": "float32",
        "chunk_size": cfg.chunk_size, "n_action_steps": cfg.n_action_steps,
        "max_state_dim": cfg.max_state_dim, "max_action_dim": cfg.max_action_dim,
        "num_inference_steps": cfg.num_steps,
        "time_sampling_beta_alpha": 1.5, "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999,
        "time_sampling_offset": 0.001,
        "min_period": cfg.min_period, "max_period": cfg.max_period,
        "image_resolution": [S, S], "empty_cameras": 0,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": norm, "ACTION": norm},
        "gradient_checkpointing": False, "compile_model": False, "compile_mode": "max-autotune",
        "optimizer_lr": 2.5e-5, "optimizer_betas": [0.9, 0.95], "optimizer_eps": 1e-8,
        "optimizer_weight_decay": 0.01, "optimizer_grad_clip_norm": 1.0,
        "scheduler_warmup_steps": 1000, "scheduler_decay_steps": 30000, "scheduler_decay_lr": 2.5e-6,
        "tokenizer_max_length": cfg.tokenizer_max_length,
    }


def mode_from_mapping(mapping: Mapping[str, str] | None, where: str) -> str | None:
    """lerobot ``normalization_mapping`` / ``norm_map`` -> fastnft's one mode for state and action (None: absent).

    Raises:
        StatisticsError: a mode fastnft does not implement (``MIN_MAX``, ``QUANTILE10``), or state and action
            normalised differently.
    """
    if not mapping:
        return None
    modes = {ft: mapping.get(ft, "IDENTITY") for ft in ("STATE", "ACTION")}
    bad = {ft: m for ft, m in modes.items() if m not in _FROM_LEROBOT}
    if bad:
        raise StatisticsError(f"{where}: normalisation {bad} is not supported (fastnft implements MEAN_STD, "
                              "QUANTILES, IDENTITY); recompute the statistics for one of those")
    if modes["STATE"] != modes["ACTION"]:
        raise StatisticsError(f"{where}: STATE is normalised with {modes['STATE']} and ACTION with "
                              f"{modes['ACTION']}; fastnft applies one mode to both: set them equal")
    return _FROM_LEROBOT[modes["STATE"]]


# -- processor pipelines -----------------------------------------------------------------------------------------
def _features(cfg: Pi0Config, with_inputs: bool) -> dict[str, Any]:
    S = cfg.vlm.image_size
    feats: dict[str, Any] = {}
    if with_inputs:
        feats.update({f"observation.images.{c}": {"type": "VISUAL", "shape": [3, S, S]} for c in cfg.cameras})
        feats[STATE_KEY] = {"type": "STATE", "shape": [cfg.state_dim]}
    feats[ACTION_KEY] = {"type": "ACTION", "shape": [cfg.action_dim]}
    return feats


def _normaliser_config(cfg: Pi0Config, norm_mode: str, eps: float, with_inputs: bool) -> dict[str, Any]:
    norm = _TO_LEROBOT[norm_mode]
    return {"eps": eps, "features": _features(cfg, with_inputs),
            "norm_map": {"VISUAL": "IDENTITY", "STATE": norm, "ACTION": norm}}


def write_lerobot_processor(path: str | Path, cfg: Pi0Config, norm_mode: str, stats: Mapping[str, Tensor],
                            eps: float = LEROBOT_EPS, device: str = "cpu") -> list[Path]:
    """Write ``policy_preprocessor.json``, ``policy_postprocessor.json`` and their normaliser ``.safetensors`` in
    the steps and order of lerobot 0.4.x's ``make_pi0_pre_post_processors`` / ``make_pi05_pre_post_processors``
    (each file atomically).

    Args:
        path: the checkpoint directory.
        cfg: the policy config (variant, cameras, widths, prompt length).
        norm_mode: ``mean_std`` | ``quantile`` | ``identity``.
        stats: ``{"observation.state.mean": [state_dim], ..., "action.q99": [action_dim]}`` float tensors; empty
            for ``identity`` (then no state file is written, as lerobot does for empty statistics).
        eps: the normaliser's epsilon (lerobot's default 1e-8).
        device: the ``device_processor`` target (lerobot's scripts override it with the policy's device).

    Returns:
        The files written.
    """
    from safetensors.torch import save_file

    d = Path(path)
    flat = {k: v.detach().float().cpu().contiguous() for k, v in stats.items()}
    tok = {"max_length": cfg.tokenizer_max_length, "task_key": "task", "padding_side": "right",
           "padding": "max_length", "truncation": True, "tokenizer_name": PALIGEMMA_TOKENIZER}
    norm = {"registry_name": "normalizer_processor", "config": _normaliser_config(cfg, norm_mode, eps, True)}
    dev = {"registry_name": "device_processor", "config": {"device": device, "float_dtype": None}}
    head = [{"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
            {"registry_name": "to_batch_processor", "config": {}}]
    if cfg.variant == "pi0":
        pre = [*head, {"registry_name": "pi0_new_line_processor", "config": {}},
               {"registry_name": "tokenizer_processor", "config": tok}, dev, norm]
    else:  # pi0.5 normalises before it writes the discretised state into the prompt
        pre = [*head, norm, {"registry_name": "pi05_prepare_state_tokenizer_processor_step",
                             "config": {"max_state_dim": cfg.max_state_dim, "task_key": "task"}},
               {"registry_name": "tokenizer_processor", "config": tok}, dev]
    post = [{"registry_name": "unnormalizer_processor", "config": _normaliser_config(cfg, norm_mode, eps, False)},
            {"registry_name": "device_processor", "config": {"device": "cpu", "float_dtype": None}}]
    written = []
    for fname, steps in ((PREPROCESSOR, pre), (POSTPROCESSOR, post)):
        name = fname.removesuffix(".json")
        for i, step in enumerate(steps):
            if step["registry_name"] in ("normalizer_processor", "unnormalizer_processor") and flat:
                state_file = f"{name}_step_{i}_{step['registry_name']}.safetensors"
                atomic_write(d / state_file, lambda tmp: save_file(flat, tmp), by_name=True)
                step["state_file"] = state_file
                written.append(d / state_file)
        text = json.dumps({"name": name, "steps": steps}, indent=2)
        atomic_write(d / fname, lambda f, text=text: f.write(text), text=True)
        written.append(d / fname)
    return written


def _normaliser_step(d: Path, fname: str, registry: str) -> tuple[dict[str, Any], dict[str, Tensor]] | None:
    """``(config, statistics)`` of the (un)normaliser step of one pipeline file; None when the file is absent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = d / fname
    if not p.is_file():
        return None
    try:
        pipe = json.loads(p.read_text())
        steps = pipe["steps"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise StatisticsError(f"{p} is not a lerobot processor file ({type(e).__name__}: {e}); re-export it with "
                              "lerobot's PolicyProcessorPipeline.save_pretrained") from e
    for step in steps:
        if step.get("registry_name") == registry:
            conf = step.get("config") or {}
            if "state_file" not in step:
                return conf, {}
            sf = d / step["state_file"]
            try:
                return conf, load_file(str(sf))
            except (SafetensorError, OSError, RuntimeError) as e:
                raise StatisticsError(f"{sf} (named by {p}) is missing or unreadable ({type(e).__name__}: {e}); "
                                      "copy it from the original checkpoint") from e
    return None


def _split(flat: Mapping[str, Tensor], feature: str) -> NormStats:
    return NormStats(**{k: (flat[f"{feature}.{k}"].float() if f"{feature}.{k}" in flat else None)
                        for k in ("mean", "std", "q01", "q99")})


def read_lerobot_processor(path: str | Path) -> FoundStats | None:
    """Statistics of lerobot 0.4.x's processor files in ``path``; None when neither pipeline file is there.

    The state's statistics come from the preprocessor's ``normalizer_processor``, the action's from the
    postprocessor's ``unnormalizer_processor`` (what lerobot applies to the policy's output), falling back to the
    other file. The mode is the normaliser's ``norm_map``.

    Raises:
        StatisticsError: a pipeline file or its state file is unreadable, or an unsupported mode.
    """
    d = Path(path)
    pre = _normaliser_step(d, PREPROCESSOR, "normalizer_processor")
    post = _normaliser_step(d, POSTPROCESSOR, "unnormalizer_processor")
    if pre is None and post is None:
        return None
    pre_conf, pre_stats = pre or ({}, {})
    post_conf, post_stats = post or ({}, {})
    conf = pre_conf or post_conf
    where = str(d / (PREPROCESSOR if pre else POSTPROCESSOR))
    mode = mode_from_mapping(conf.get("norm_map"), where)
    state = _split(pre_stats or post_stats, STATE_KEY)
    action = _split(post_stats if any(k.startswith(ACTION_KEY + ".") for k in post_stats) else pre_stats,
                    ACTION_KEY)
    files = [str(d / f) for f, x in ((PREPROCESSOR, pre), (POSTPROCESSOR, post)) if x is not None]
    return FoundStats(mode, state, action, "lerobot", float(conf.get("eps", LEROBOT_EPS)), " + ".join(files))


_BUFFERS = {STATE_KEY: ("normalize_inputs.buffer_observation_state.",),
            ACTION_KEY: ("unnormalize_outputs.buffer_action.", "normalize_targets.buffer_action.")}


def read_lerobot03_buffers(weights: str | Path) -> FoundStats | None:
    """Statistics lerobot 0.3.x stored inside ``model.safetensors`` (``normalize_inputs.buffer_observation_state.*``,
    ``unnormalize_outputs.buffer_action.*``); None when there are none, or they are the ``inf`` placeholders
    lerobot 0.3 writes for a policy built without statistics. The mode comes from config.json; the formulas are
    lerobot's (``eps`` 1e-8).
    """
    from safetensors import safe_open

    p = Path(weights)
    if not p.is_file():
        return None
    out: dict[str, dict[str, Tensor]] = {STATE_KEY: {}, ACTION_KEY: {}}
    with safe_open(str(p), framework="pt") as f:
        keys = list(f.keys())
        for feat, prefixes in _BUFFERS.items():
            for pre in prefixes:
                for k in keys:
                    # the lerobot layout prefixes nothing here: these buffers sit on the policy, not on .model
                    if k.startswith(pre) and k[len(pre):] in ("mean", "std"):
                        out[feat].setdefault(k[len(pre):], f.get_tensor(k).float())
    found = {feat: {k: v for k, v in st.items() if bool(torch.isfinite(v).all())} for feat, st in out.items()}
    if not any(found.values()):
        return None
    ns = {feat: NormStats(mean=st.get("mean"), std=st.get("std")) for feat, st in found.items()}
    return FoundStats(None, ns[STATE_KEY], ns[ACTION_KEY], "lerobot", LEROBOT_EPS, str(p))
