"""Build the policy a config names (``policy.kind``): the state-based expert or pi0 / pi0.5, behind FlowPolicy.

- ``state_flow``: the SFT policy file (:func:`fastnft.policies.io.load_policy`).
- ``pi0``: a local checkpoint directory in the openpi PyTorch / lerobot layout (``policy.checkpoint``), with the
  runtime fields of ``policy.pi0`` applied; or, with ``policy.checkpoint: null``, a randomly initialised model of
  the architecture in ``policy.pi0`` (CPU smoke runs and tests), which has no statistics (identity normalisation).
  Its weights are drawn from a seeded generator, so a resumed run rebuilds the same frozen prefix; its prompts use
  :class:`~fastnft.policies.tokenizer.ByteTokenizer`.

``policy.num_steps`` (the sampler's K) and ``policy.n_action_steps`` (executed steps per call) apply to every kind;
for pi0 they replace the checkpoint's values, so ``policy.pi0`` must not set them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastnft.config import ConfigError, ExperimentConfig
from fastnft.policies.base import FlowPolicy

__all__ = ["build_flow_policy", "pi0_config_from"]

_SHARED = ("num_steps", "n_action_steps")  # owned by policy.*, not policy.pi0.*


def _renamed(e: ConfigError) -> ConfigError:
    """Pi0Config names its keys ``pi0.<field>``; in an experiment YAML they live under ``policy.``."""
    msg = str(e).replace("'pi0.", "'policy.pi0.").replace("['pi0.", "['policy.pi0.")
    for k in _SHARED:  # injected from policy.<k>, so name the key the user set
        msg = msg.replace(f"'policy.pi0.{k}'", f"'policy.{k}'")
    return ConfigError(msg)


def _pi0_block(cfg: ExperimentConfig) -> dict[str, Any]:
    block = dict(cfg.policy.pi0 or {})
    clash = [k for k in _SHARED if k in block]
    if clash:
        raise ConfigError(f"config keys {['policy.pi0.' + k for k in clash]}: set policy.{clash[0]} instead (it "
                          "applies to every policy kind)")
    return block


def pi0_config_from(cfg: ExperimentConfig, *, state_dim: int, act_dim: int):
    """The :class:`~fastnft.policies.pi0_config.Pi0Config` of a random-init pi0 run (``policy.checkpoint: null``).

    ``policy.pi0`` gives the architecture; ``cameras``, ``state_dim`` and ``action_dim`` default to the env's.

    Raises:
        ConfigError: an invalid ``policy.pi0`` key or value (named ``policy.pi0.<key>``).
    """
    from fastnft.policies.pi0_config import Pi0Config

    block = _pi0_block(cfg)
    block.setdefault("cameras", list(cfg.env.cameras))
    block.setdefault("state_dim", state_dim)
    block.setdefault("action_dim", act_dim)
    block["cameras"] = tuple(block["cameras"])
    block.update(num_steps=cfg.policy.num_steps, n_action_steps=cfg.policy.n_action_steps)
    try:
        return Pi0Config.from_dict(block)
    except ConfigError as e:
        raise _renamed(e) from None


def _check_fits_env(policy: Any, cfg: ExperimentConfig, state_dim: int, act_dim: int) -> None:
    pc = policy.cfg
    if pc.action_dim != act_dim:
        raise ConfigError(f"policy.pi0.action_dim={pc.action_dim} but env {cfg.env.task!r} with control_mode "
                          f"{cfg.env.control_mode!r} has {act_dim} action dims; set policy.pi0.action_dim: {act_dim} "
                          "or choose the control mode the checkpoint was trained with")
    if pc.state_dim != state_dim:
        raise ConfigError(f"policy.pi0.state_dim={pc.state_dim} but the env's observation.state has {state_dim} "
                          f"entries; set policy.pi0.state_dim: {state_dim}")
    if not set(pc.cameras) & set(cfg.env.cameras):
        raise ConfigError(f"the policy reads cameras {list(pc.cameras)} but env.cameras is {list(cfg.env.cameras)}; "
                          "name the env's cameras in policy.pi0.cameras (in the checkpoint's camera order)")
    if pc.n_action_steps > pc.chunk_size:
        raise ConfigError(f"policy.n_action_steps={pc.n_action_steps} exceeds the pi0 action horizon "
                          f"(chunk_size={pc.chunk_size}); lower policy.n_action_steps")
    tok = policy.processor.tokenizer if policy.processor is not None else None
    if tok is not None and tok.vocab_size > pc.vlm.vocab_size:
        raise ConfigError(f"the prompt tokenizer has {tok.vocab_size} ids but policy.pi0.vlm.vocab_size is "
                          f"{pc.vlm.vocab_size}; raise the vocabulary or use the checkpoint's tokenizer.model")


def _build_pi0(cfg: ExperimentConfig, state_dim: int, act_dim: int, seed: int) -> FlowPolicy:
    from fastnft.policies.pi0 import Pi0Policy
    from fastnft.policies.processor import Pi0Processor
    from fastnft.policies.tokenizer import ByteTokenizer

    if cfg.env.obs_mode != "rgb":
        raise ConfigError("policy.kind: pi0 reads camera frames; set env.obs_mode: rgb and env.cameras")
    if cfg.policy.checkpoint is not None:
        overrides = _pi0_block(cfg)
        overrides.update(num_steps=cfg.policy.num_steps, n_action_steps=cfg.policy.n_action_steps)
        policy = Pi0Policy.load(cfg.policy.checkpoint, **overrides)
    else:
        pcfg = pi0_config_from(cfg, state_dim=state_dim, act_dim=act_dim)
        if pcfg.normalization in ("mean_std", "quantile"):
            raise ConfigError(f"policy.pi0.normalization: {pcfg.normalization} needs statistics, but a random-init pi0 "
                              "(policy.checkpoint: null) has none; use auto or identity, or load a checkpoint")
        proc = Pi0Processor(pcfg, ByteTokenizer(pcfg.tokenizer_max_length), norm_mode="identity")
        with torch.random.fork_rng(devices=[]):  # the same frozen prefix on every (re)start of this run
            torch.manual_seed(seed)
            policy = Pi0Policy(pcfg, proc)
    _check_fits_env(policy, cfg, state_dim, act_dim)
    return policy


def build_flow_policy(cfg: ExperimentConfig, *, init: str | Path | None, state_dim: int | None = None,
                      act_dim: int | None = None, seed: int = 0) -> FlowPolicy:
    """The start policy of a training run, on the CPU (the engine moves it).

    Args:
        cfg: experiment config (``policy.kind`` picks the implementation).
        init: ``state_flow``: the policy file (SFT output or ``--init``); ignored for pi0.
        state_dim: width of the env's state observation (``observation.state``); needed for pi0.
        act_dim: the env's action dim; needed for pi0.
        seed: random-init seed (pi0 without a checkpoint).

    Raises:
        ConfigError: the policy does not fit the env or the config (the message names the key).
        fastnft.policies.io.PolicyFileError / fastnft.policies.pi0_checkpoint.CheckpointError: unreadable or
            mismatched policy files, naming the file and the keys.
    """
    if cfg.policy.kind == "pi0":
        if state_dim is None or act_dim is None:
            raise ValueError("build_flow_policy(kind pi0) needs the env's state_dim and act_dim")
        return _build_pi0(cfg, state_dim, act_dim, seed)
    from fastnft.policies.io import load_policy

    if init is None:
        raise ConfigError("policy.kind: state_flow starts from a policy file; run `fastnft sft` or pass --init")
    policy, _ = load_policy(init, cfg)
    return policy
