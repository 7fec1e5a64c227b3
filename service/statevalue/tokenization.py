"""Text <-> token ids with the policy's tokenizer, aligned exactly to the trainer's ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class TokenText:
    """Decodes response ids to text with per-token character end offsets, and encodes text.

    Each id decodes on its own (a table built once), so offsets line up with the ids the
    trainer sampled even where re-tokenising the decoded text would split it differently.
    A byte-level token holding part of a multi-byte character decodes to a replacement
    character; numbers are ASCII, so Numca's offsets are unaffected.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        pieces = tokenizer.batch_decode(
            [[i] for i in range(vocab_size)],
            skip_special_tokens=False,
            clean_up_tokenization_spaces=False,
        )
        self._pieces = np.array(pieces, dtype=object)
        self._piece_lengths = np.array([len(p) for p in pieces], dtype=np.int64)

    def decode_with_offsets(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """The response text and, per token, the character offset where that token ends."""
        if len(ids) == 0:
            return "", np.zeros(0, dtype=np.int64)
        return "".join(self._pieces[ids]), np.cumsum(self._piece_lengths[ids])

    def encode_text(self, text: str) -> np.ndarray:
        """Token ids of a raw string, without special tokens."""
        ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> np.ndarray:
        """Token ids of chat messages through the model's chat template, ready for a reply."""
        if getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError("the model's tokenizer has no chat template; send prompt_text or ids")
        encoded = self._tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True
        )
        ids = (
            encoded["input_ids"]
            if isinstance(encoded, dict) or hasattr(encoded, "keys")
            else encoded
        )
        return np.asarray(ids, dtype=np.int32)
