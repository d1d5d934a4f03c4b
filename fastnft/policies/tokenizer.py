"""The language prompt -> PaliGemma token ids, from a local SentencePiece model (``tokenizer.model``); no network.

:class:`ByteTokenizer` serves randomly initialised policies (``policy.checkpoint: null``, CPU smoke runs): there is no
pretrained vocabulary to match, so UTF-8 bytes are the tokens.

Formats, token for token as openpi's ``PaligemmaTokenizer.tokenize`` (``src/openpi/models/tokenizer.py``), right-padded
with id 0 to ``max_length``; ``clean`` strips the task and turns ``_`` and newlines into spaces (``pick_cube`` reads
as words):

- pi0: ``[BOS] + tokens(clean(task)) + tokens("\\n")`` (the newline, the "start of answer", encoded on its own);
- pi0.5: ``[BOS] + tokens("Task: <clean(task)>, State: <bins>;\\nAction: ")`` encoded in one piece, newline and
  trailing space included (:func:`pi05_prompt`, :func:`discretize_state`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["ByteTokenizer", "PromptTokenizer", "TokenizerError", "discretize_state", "make_tokenizer", "pi05_prompt"]


class TokenizerError(ValueError):
    """The tokenizer file is missing or unreadable, or a prompt does not fit; the message names the fix."""


def discretize_state(state: Tensor, bins: int = 256) -> list[int]:
    """pi0.5's state bins: openpi's ``np.digitize(state, np.linspace(-1, 1, bins + 1)[:-1]) - 1``, computed with
    that very numpy call (float64 edges).

    Args:
        state: ``[state_dim]`` normalised state (nominally in [-1, 1]).

    Returns:
        one int per entry: ``k`` for ``-1 + 2k/bins <= x < -1 + 2(k+1)/bins``; values ``>= 1 - 2/bins`` give
        ``bins - 1`` and values below -1 give **-1** (openpi does not clamp; neither does this).

    Raises:
        ValueError: a non-finite entry (openpi would silently write bin ``bins - 1`` for NaN).
    """
    x = state.detach().to("cpu", torch.float64).reshape(-1).numpy()
    if not np.isfinite(x).all():
        raise ValueError(f"pi0.5 prompt: the normalised state has non-finite entries {x.tolist()}; check the "
                         "state statistics (a zero std or q01 == q99) and the env's observation")
    return (np.digitize(x, bins=np.linspace(-1, 1, bins + 1)[:-1]) - 1).tolist()


def pi05_prompt(task: str, state: Tensor, bins: int = 256) -> str:
    """pi0.5's prompt with the state, openpi's string: ``"Task: <clean(task)>, State: <bins>;\\nAction: "``.

    Args:
        task: instruction.
        state: ``[state_dim]`` normalised state, unpadded; each entry becomes its bin (:func:`discretize_state`).
    """
    return f"Task: {_clean(task)}, State: {' '.join(map(str, discretize_state(state, bins)))};\nAction: "


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

    def _bos(self) -> list[int]:
        bos = self.sp.bos_id()
        return [bos] if bos >= 0 else []

    def _pieces(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_one(self, prompt: str, state: Tensor | None = None) -> list[int]:
        """Token ids of one prompt, unpadded and untruncated.

        Args:
            prompt: the task instruction.
            state: None for pi0 (``[BOS] + tokens(clean(prompt)) + tokens("\\n")``); pi0.5's normalised
                ``[state_dim]`` state (``[BOS] + tokens(pi05_prompt(prompt, state))``, one piece).
        """
        if state is not None:
            return self._bos() + self._pieces(pi05_prompt(prompt, state))
        return self._bos() + self._pieces(_clean(prompt)) + self._pieces("\n")

    def __call__(self, prompts: list[str], device: torch.device | str | None = None,
                 states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Tokenize a batch; ``states [B, state_dim]`` (pi0.5) puts each row's bins in its prompt.

        Returns:
            ``(ids [B, L] int64, mask [B, L] bool)``, padding id 0 with mask False.

        Raises:
            TokenizerError: a prompt is longer than L and ``truncate`` is False.
        """
        L = self.max_length
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        if states is not None and len(states) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(states)} states; pass one state row per prompt")
        for i, p in enumerate(prompts):
            toks = self.encode_one(p, None if states is None else states[i])
            if len(toks) > L and not self.truncate:
                raise TokenizerError(f"prompt {p!r} has {len(toks)} tokens > pi0.tokenizer_max_length={L}; "
                                     "raise it or shorten the instruction")
            toks = toks[:L]
            ids[i, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, : len(toks)] = True
        return ids.to(device), mask.to(device)


class ByteTokenizer(PromptTokenizer):
    """UTF-8 byte tokens in pi0's prompt format, for randomly initialised policies (no tokenizer file).

    Ids: 0 padding, 1 BOS, ``3 + byte`` for each byte of the prompt string (pi0: ``clean(prompt) + "\\n"``; pi0.5:
    :func:`pi05_prompt`); so the language model's
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

    def _bos(self) -> list[int]:
        return [1]

    def _pieces(self, text: str) -> list[int]:
        return [self.OFFSET + b for b in text.encode("utf-8")]


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
