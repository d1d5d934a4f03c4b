"""config.json of ``transformers.models.pi0`` (``PI0Config``) <-> fastnft's :class:`Pi0Config` fields.

transformers' PI0 config nests a PaliGemma config (``vlm_config``: ``text_config`` = Gemma 2B, ``vision_config`` =
SigLIP) and a Gemma config for the expert (``dit_config``). A field absent from the file takes transformers'
default, which is the full-size pi0 (the same sizes as :class:`Pi0Config`'s defaults). Plain JSON both ways, so
reading needs no transformers 5.x installed.
"""

from __future__ import annotations

from typing import Any

from fastnft.policies.pi0_config import Pi0Config

__all__ = ["from_transformers_config", "is_transformers_config", "to_transformers_config"]

# fastnft VLMConfig field -> (sub-config, transformers field)
_VLM = {"width": ("text", "hidden_size"), "depth": ("text", "num_hidden_layers"),
        "mlp_dim": ("text", "intermediate_size"), "num_heads": ("text", "num_attention_heads"),
        "num_kv_heads": ("text", "num_key_value_heads"), "head_dim": ("text", "head_dim"),
        "vocab_size": ("text", "vocab_size"), "rms_norm_eps": ("text", "rms_norm_eps"),
        "vision_width": ("vision", "hidden_size"), "vision_depth": ("vision", "num_hidden_layers"),
        "vision_mlp_dim": ("vision", "intermediate_size"), "vision_heads": ("vision", "num_attention_heads"),
        "image_size": ("vision", "image_size"), "patch_size": ("vision", "patch_size")}
_EXPERT = {"width": "hidden_size", "depth": "num_hidden_layers", "mlp_dim": "intermediate_size",
           "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim"}
_TOP = {"chunk_size": "chunk_size", "max_state_dim": "max_state_dim", "max_action_dim": "max_action_dim",
        "num_steps": "num_inference_steps", "min_period": "min_period", "max_period": "max_period"}


def is_transformers_config(conf: dict[str, Any]) -> bool:
    """True for a config.json written by transformers' ``PI0ForConditionalGeneration.save_pretrained``."""
    return conf.get("model_type") == "pi0" and ("vlm_config" in conf or "dit_config" in conf)


def _theta(sub: dict[str, Any]) -> float | None:
    rope = sub.get("rope_parameters") or {}
    return rope.get("rope_theta", sub.get("rope_theta"))


def from_transformers_config(conf: dict[str, Any]) -> dict[str, Any]:
    """transformers ``PI0Config`` JSON -> :meth:`Pi0Config.from_dict` fields (variant ``pi0``). That config holds no
    cameras and no env state / action widths: cameras keep fastnft's default, the widths are the padded
    ``max_state_dim`` / ``max_action_dim``; override them at load (``Pi0Policy.load(dir, cameras=..., ...)``)."""
    vlm = conf.get("vlm_config") or {}
    subs = {"text": vlm.get("text_config") or {}, "vision": vlm.get("vision_config") or {}}
    dit = conf.get("dit_config") or {}
    d: dict[str, Any] = {"variant": "pi0"}
    d.update({ours: conf[theirs] for ours, theirs in _TOP.items() if theirs in conf})
    v = {ours: subs[s][theirs] for ours, (s, theirs) in _VLM.items() if theirs in subs[s]}
    if _theta(subs["text"]) is not None:
        v["rope_theta"] = _theta(subs["text"])
    d["vlm"] = v
    d["expert"] = {ours: dit[theirs] for ours, theirs in _EXPERT.items() if theirs in dit}
    if "chunk_size" in d:
        d["n_action_steps"] = d["chunk_size"]
    # the env's widths are not in this config: the padded ones until the caller overrides them at load
    d["state_dim"] = d.get("max_state_dim", 32)
    d["action_dim"] = d.get("max_action_dim", 32)
    return d


def to_transformers_config(cfg: Pi0Config) -> dict[str, Any]:
    """:class:`Pi0Config` -> the config.json ``PI0ForConditionalGeneration.from_pretrained`` reads (pi0 only).

    Raises:
        ValueError: a pi0.5 config (transformers implements pi0 only).
    """
    if cfg.variant != "pi0":
        raise ValueError("transformers.models.pi0 implements pi0 only; save pi0.5 with layout 'lerobot' or 'openpi'")
    v, e = cfg.vlm, cfg.expert
    text: dict[str, Any] = {"model_type": "gemma", "rope_parameters": {"rope_type": "default",
                                                                        "rope_theta": v.rope_theta}}
    vision: dict[str, Any] = {"model_type": "siglip_vision_model", "vision_use_head": False}
    for ours, (sub, theirs) in _VLM.items():
        (text if sub == "text" else vision)[theirs] = getattr(v, ours)
    dit = {"model_type": "gemma", "vocab_size": v.vocab_size, "rms_norm_eps": v.rms_norm_eps,
           "rope_parameters": {"rope_type": "default", "rope_theta": v.rope_theta},
           **{theirs: getattr(e, ours) for ours, theirs in _EXPERT.items()}}
    out: dict[str, Any] = {"architectures": ["PI0ForConditionalGeneration"], "model_type": "pi0",
                           **{theirs: getattr(cfg, ours) for ours, theirs in _TOP.items()},
                           "vlm_config": {"model_type": "paligemma", "text_config": text, "vision_config": vision,
                                          "projection_dim": v.width, "image_token_id": v.vocab_size},
                           "dit_config": dit}
    return out
