"""Shared builders of the pi0 tests: a tiny SentencePiece model trained in the test, raw observations."""

from __future__ import annotations

from pathlib import Path

import torch

from fastnft.policies.pi0_config import Pi0Config
from fastnft.policies.processor import STATE_KEY, image_key

CORPUS = ["pick up the red cube and place it on the goal", "push the blue block to the left", "open the drawer",
          "stack the green cube on the red cube", "Task: pick cube, State: 1 2 3 128 255;\nAction: "]


def train_tiny_spm(folder: Path, vocab_size: int = 40) -> Path:
    """Train a SentencePiece model in well under a second; PaliGemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm

    prefix = folder / "tok"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_prefix=str(prefix),
                                   vocab_size=vocab_size, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   user_defined_symbols=["\n"], normalization_rule_name="identity",
                                   hard_vocab_limit=False, minloglevel=2)
    return prefix.with_suffix(".model")


def raw_obs(cfg: Pi0Config, B: int = 2, seed: int = 0, hw: tuple[int, int] = (12, 20)) -> dict:
    """Raw observations as an env gives them: uint8 HWC frames per camera, the state, the instruction."""
    g = torch.Generator().manual_seed(seed)
    obs = {image_key(c): torch.randint(0, 256, (B, *hw, 3), generator=g, dtype=torch.uint8) for c in cfg.cameras}
    obs[STATE_KEY] = torch.randn(B, cfg.state_dim, generator=g)
    obs["task"] = "pick up the red cube"
    return obs
