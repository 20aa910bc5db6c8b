"""Prompt tokenisation with the checkpoint's own ``tokenizer.json`` (the `tokenizers` library).

No transformers dependency at run time: a tokenizer.json fully describes normaliser, WordPiece
vocabulary and post-processor, and the Rust tokenizer is fast enough to never matter.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from radflash.errors import CheckpointError, InputError


class PromptTokenizer:
    def __init__(self, tokenizer: Tokenizer, *, pad_id: int, max_length: int, source: str = "tokenizer") -> None:
        self._tok = tokenizer
        self.pad_id = pad_id
        self.max_length = max_length
        self.source = source
        self._tok.no_padding()
        self._tok.enable_truncation(max_length)

    @classmethod
    def from_file(cls, path: str | Path, *, pad_id: int, max_length: int) -> PromptTokenizer:
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"{path}: not a valid tokenizer.json ({exc})") from None
        return cls(tok, pad_id=pad_id, max_length=max_length, source=str(path))

    @classmethod
    def from_str(cls, text: str, *, pad_id: int, max_length: int, source: str) -> PromptTokenizer:
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:
            raise CheckpointError(f"{source}: not a valid tokenizer.json ({exc})") from None
        return cls(tok, pad_id=pad_id, max_length=max_length, source=source)

    def to_str(self) -> str:
        return self._tok.to_str()

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded (ids, attention_mask), each (T, L_max) int64."""
        check_prompts(prompts)
        encodings = self._tok.encode_batch(list(prompts))
        length = max(len(e.ids) for e in encodings)
        ids = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = torch.tensor(enc.ids, dtype=torch.long)
            mask[row, : len(enc.ids)] = 1
        return ids, mask


def check_prompts(prompts: Sequence[str]) -> None:
    if isinstance(prompts, str):
        raise InputError("prompts must be a list of strings, not a single string")
    if len(prompts) == 0:
        raise InputError("the prompt list is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt #{i} is {p!r}: prompts must be non-empty strings")
