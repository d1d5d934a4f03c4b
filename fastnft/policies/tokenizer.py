"""The language prompt -> PaliGemma token ids, from a local SentencePiece model (``tokenizer.model``); no network.

:class:`ByteTokenizer` serves randomly initialised policies (``policy.checkpoint: null``, CPU smoke runs): there is no
pretrained vocabulary to match, so UTF-8 bytes are the tokens.

Format (openpi / PaliGemma): ``[BOS] + tokens(clean(prompt)) + tokens("\\n")``, right-padded with id 0 to
``max_length``; ``clean`` strips the prompt and turns ``_`` and newlines into spaces (task names such as
``pick_cube`` read as words). pi0.5 puts the discretised state in the prompt (:func:`pi05_prompt`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "PromptTokenizer", "TokenizerError", "make_tokenizer", "pi05_prompt"]


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable, or a prompt does not fit; the message names the fix."""


def pi05_prompt(task: str, state: Tensor, bins: int = 256) -> str:
    """pi0.5's prompt with the state: ``"Task: <task>, State: <ids>;\\nAction: "``.

    Args:
        task: instruction.
        state: ``[state_dim]`` normalised to [-1, 1]; each entry becomes its bin index in ``0..bins-1``.
    """
    edges = torch.linspace(-1.0, 1.0, bins + 1, device=state.device)[:-1]
    ids = (torch.bucketize(state.float().clamp(-1, 1), edges, right=True) - 1).clamp(0, bins - 1)
    return f"Task: {_clean(task)}, State: {' '.join(str(int(i)) for i in ids)};\nAction: "


def _clean(text: str) -> str:
    return text.strip().replace("_", " ").replace("\n", " ")


class PromptTokenizer:
    """SentencePiece tokenizer with pi0's prompt format.

    Args:
        model_file: path of a SentencePiece ``.model`` file (PaliGemma's ``tokenizer.model``).
        max_length: tokens per prompt L (openpi: 48 for pi0, 200 for pi0.5).
        truncate: cut prompts longer than L (openpi's behaviour); False raises instead.

    Raises:
        TokenizerError: the file is missing or not a SentencePiece model.
    """

    def __init__(self, model_file: str | Path, max_length: int, truncate: bool = True) -> None:
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise TokenizerError(f"tokenizer file {str(self.model_file)!r} does not exist; put PaliGemma's "
                                 "SentencePiece tokenizer.model next to model.safetensors")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        except Exception as e:  # sentencepiece raises OSError/RuntimeError on a bad file
            raise TokenizerError(f"tokenizer file {str(self.model_file)!r} is not a SentencePiece model "
                                 f"({type(e).__name__}: {e})") from e
        self.max_length, self.truncate = max_length, truncate

    @property
    def vocab_size(self) -> int:
        """Pieces in the model (must be <= the language model's vocabulary)."""
        return int(self.sp.get_piece_size())

    def encode_one(self, prompt: str) -> list[int]:
        """Token ids of one prompt, unpadded and untruncated: ``[BOS] + tokens(clean) + tokens("\\n")``."""
        bos = self.sp.bos_id()
        return ([bos] if bos >= 0 else []) + self.sp.encode(_clean(prompt)) + self.sp.encode("\n")

    def __call__(self, prompts: list[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Tokenize a batch.

        Returns:
            ``(ids [B, L] int64, mask [B, L] bool)``, padding id 0 with mask False.

        Raises:
            TokenizerError: a prompt is longer than L and ``truncate`` is False.
        """
        L = self.max_length
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, p in enumerate(prompts):
            toks = self.encode_one(p)
            if len(toks) > L and not self.truncate:
                raise TokenizerError(f"prompt {p!r} has {len(toks)} tokens > pi0.tokenizer_max_length={L}; "
                                     "raise it or shorten the instruction")
            toks = toks[:L]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids.to(device), mask.to(device)


class ByteTokenizer(PromptTokenizer):
    """UTF-8 byte tokens in pi0's prompt format, for randomly initialised policies (no tokenizer file).

    Ids: 0 padding, 1 BOS, ``3 + byte`` for each byte of ``clean(prompt) + "\\n"``; so the language model's
    vocabulary must hold at least :attr:`vocab_size` = 259 ids.

    Args:
        max_length: tokens per prompt L.
        truncate: cut prompts longer than L; False raises :class:`TokenizerError` instead.
    """

    OFFSET = 3

    def __init__(self, max_length: int, truncate: bool = True) -> None:  # no SentencePiece model to load
        self.model_file = None
        self.max_length, self.truncate = max_length, truncate

    @property
    def vocab_size(self) -> int:
        return self.OFFSET + 256

    def encode_one(self, prompt: str) -> list[int]:
        return [1] + [self.OFFSET + b for b in (_clean(prompt) + "\n").encode("utf-8")]


def make_tokenizer(kind: str | None, model_file: str | Path | None, max_length: int) -> PromptTokenizer | None:
    """The prompt tokenizer a processor export names: ``sentencepiece`` (``model_file``), ``byte``, or None.

    Raises:
        TokenizerError: unknown kind, or ``sentencepiece`` without a readable model file.
    """
    if kind == "byte":
        return ByteTokenizer(max_length)
    if kind in (None, "sentencepiece"):
        return PromptTokenizer(model_file, max_length) if model_file else None
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; expected 'sentencepiece' or 'byte'")
