"""DeepSpeed config of the actor engine (no process group, no DeepSpeed import)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastnft.config import EngineConfig, TrainConfig
from fastnft.engine.zero import build_ds_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_one_backward_step_pair_is_one_optimizer_step(stage: int) -> None:
    cfg = build_ds_config(TrainConfig(grad_clip=0.7), EngineConfig(zero_stage=stage), use_cuda=False)
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_clipping"] == 0.7
    assert cfg["zero_optimization"]["stage"] == stage
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


@pytest.mark.parametrize("use_cuda", [False, True])
def test_bf16_keeps_deepspeed_in_fp32(use_cuda: bool) -> None:
    """bf16 is autocast inside the policy: DeepSpeed must keep fp32 weights (the masters), on CPU and CUDA."""
    cfg = build_ds_config(TrainConfig(), EngineConfig(dtype="bfloat16"), use_cuda=use_cuda)
    assert not cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]


def test_json_template_matches_builder() -> None:
    """configs/deepspeed_zero2.json documents exactly what the engine uses (defaults, ZeRO-2, CUDA)."""
    tmpl = json.loads((REPO / "configs" / "deepspeed_zero2.json").read_text())
    assert tmpl == build_ds_config(TrainConfig(), EngineConfig(zero_stage=2), use_cuda=True)
