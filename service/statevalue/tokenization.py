"""Text <-> token ids with the policy's tokenizer, aligned exactly to the trainer's ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

_REPLACEMENT = "\ufffd"


class TokenText:
    """Decodes response ids to text with per-token character end offsets, and encodes text.

    Offsets come from incremental decoding: token k ends where the text decoded so far
    ends once token k is in, so they line up with the ids the trainer sampled even where
    re-tokenising the decoded text would split it differently. Decoding each id on its own
    would be wrong for SentencePiece "Metaspace" tokenizers (a leading "▁" is dropped at the
    start of a text, so "▁12▁34" would read "1234") and for byte pieces of a character.

    Fast path: a table of each id's text when it follows a plain anchor token. A response
    whose tokens all decode to whole characters that way is the concatenation of those
    pieces (the first token decoded alone); any other response is decoded incrementally.
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        ids = range(vocab_size)
        alone = self._batch_decode([[i] for i in ids])
        anchor = self._anchor_id(alone)
        anchor_text = alone[anchor]
        after = [
            text[len(anchor_text) :] if text.startswith(anchor_text) else None
            for text in self._batch_decode([[anchor, i] for i in ids])
        ]
        self._alone = np.array(alone, dtype=object)
        self._after = np.array([piece or "" for piece in after], dtype=object)
        self._after_lengths = np.array([len(piece or "") for piece in after], dtype=np.int64)
        self._regular = np.array(
            [
                piece is not None and _REPLACEMENT not in piece and _REPLACEMENT not in first
                for piece, first in zip(after, alone, strict=True)
            ],
            dtype=bool,
        )

    def _batch_decode(self, sequences: list[list[int]]) -> list[str]:
        return self._tokenizer.batch_decode(
            sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
        )

    def _anchor_id(self, alone: list[str]) -> int:
        """An id that decodes to one plain letter: what precedes a piece in the table."""
        for text in ("a", "x", "A"):
            encoded = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and alone[encoded[0]] == text:
                return int(encoded[0])
        for i, text in enumerate(alone):
            if len(text) == 1 and text.isalpha():
                return i
        raise ValueError("the tokenizer has no single-letter token to anchor offsets")

    def decode_with_offsets(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """The response text and, per token, the character offset where that token ends."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return "", np.zeros(0, dtype=np.int64)
        if self._regular[ids].all():
            first = self._alone[ids[0]]
            lengths = np.concatenate([[len(first)], self._after_lengths[ids[1:]]])
            return first + "".join(self._after[ids[1:]]), np.cumsum(lengths)
        return self._decode_incrementally(ids.tolist())

    def token_texts(self, ids: np.ndarray) -> list[str]:
        """Each token's piece of the response text (empty for a token that only starts a
        character; the token that completes it holds it)."""
        text, ends = self.decode_with_offsets(ids)
        starts = np.concatenate([[0], ends]).astype(np.int64)[:-1]
        return [text[start:end] for start, end in zip(starts.tolist(), ends.tolist(), strict=True)]

    def _decode_incrementally(self, ids: list[int]) -> tuple[str, np.ndarray]:
        """Offsets by decoding a short window that ends at each token.

        ``prefix``..``read`` is text already emitted, decoded again as left context so that
        a token's leading space and its bytes of a character come out as in the full text.
        A token that leaves a character incomplete emits nothing until one completes it.
        """
        pieces: list[str] = []
        prefix = read = 0
        for k in range(len(ids)):
            before = self._decode(ids[prefix:read])
            now = self._decode(ids[prefix : k + 1])
            if len(now) > len(before) and not now.endswith(_REPLACEMENT):
                pieces.append(now[len(before) :])
                prefix, read = read, k + 1
            else:
                pieces.append("")
        if read < len(ids):
            # The response ends inside a character: its last token holds what is left.
            pieces[-1] = self._decode(ids[prefix:])[len(self._decode(ids[prefix:read])) :]
        return "".join(pieces), np.cumsum([len(piece) for piece in pieces]).astype(np.int64)

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
