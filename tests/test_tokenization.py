"""Character offsets of response tokens, by incremental decoding, for both tokenizer families."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import NumcaConfig
from statevalue.estimators import numca_path
from statevalue.tokenization import TokenText

# A Llama-2 style SentencePiece vocabulary: "▁" marks a space, bytes fall back to <0xNN>.
METASPACE_VOCAB = ["<unk>", "▁Tom", "▁has", "▁12", "▁34", "▁5", "▁caf", "<0xC3>", "<0xA9>", "a"]
# GPT-2 style byte-level pieces: "Ġ" is a space byte; "Ã" + "©" are the two bytes of "é".
BYTE_LEVEL_VOCAB = ["Tom", "Ġhas", "Ġ12", "Ġ34", "Ġ5", "Ġcaf", "Ã", "©", "a"]


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {piece: i for i, piece in enumerate(METASPACE_VOCAB)}
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    tokenizer = Tokenizer(model)
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {piece: i for i, piece in enumerate(BYTE_LEVEL_VOCAB)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def ids_of(vocab: list[str], pieces: list[str]) -> np.ndarray:
    return np.array([vocab.index(p) for p in pieces], dtype=np.int64)


def test_metaspace_numbers_stay_apart() -> None:
    token_text = TokenText(metaspace_tokenizer(), len(METASPACE_VOCAB))
    ids = ids_of(METASPACE_VOCAB, ["▁Tom", "▁has", "▁12", "▁34", "▁5"])
    text, ends = token_text.decode_with_offsets(ids)
    assert text == "Tom has 12 34 5"
    assert token_text.token_texts(ids) == ["Tom", " has", " 12", " 34", " 5"]
    # Two milestones (12 and 34; 5 is the answer), each starting after its token.
    path = numca_path(text, ends, NumcaConfig.reference(merge_distance=0))
    assert path.boundaries.tolist() == [0, 3, 4]
    assert path.states == (frozenset(), frozenset({"12"}), frozenset({"12", "34"}))


def test_metaspace_byte_fallback_character() -> None:
    tokenizer = metaspace_tokenizer()
    token_text = TokenText(tokenizer, len(METASPACE_VOCAB))
    ids = ids_of(METASPACE_VOCAB, ["▁caf", "<0xC3>", "<0xA9>", "▁12", "▁5"])
    text, _ = token_text.decode_with_offsets(ids)
    assert text == tokenizer.decode(ids.tolist()) == "café 12 5"
    # The first byte of "é" completes no character: it ends where the token before it ends.
    assert token_text.token_texts(ids) == ["caf", "", "é", " 12", " 5"]


def test_byte_level_multibyte_character_split_across_tokens() -> None:
    tokenizer = byte_level_tokenizer()
    token_text = TokenText(tokenizer, len(BYTE_LEVEL_VOCAB))
    ids = ids_of(BYTE_LEVEL_VOCAB, ["Tom", "Ġcaf", "Ã", "©", "Ġ12", "Ġ34", "Ġ5"])
    text, _ = token_text.decode_with_offsets(ids)
    assert text == tokenizer.decode(ids.tolist()) == "Tom café 12 34 5"
    assert token_text.token_texts(ids) == ["Tom", " caf", "", "é", " 12", " 34", " 5"]
    assert token_text.token_texts(ids[:0]) == []
    # A response that stops inside a character keeps what its bytes decode to.
    cut, cut_ends = token_text.decode_with_offsets(ids[:3])
    assert cut == tokenizer.decode(ids[:3].tolist()) and cut_ends[-1] == len(cut)


@pytest.mark.parametrize("family", ["metaspace", "byte_level"])
def test_fast_table_agrees_with_incremental_decoding(family: str) -> None:
    tokenizer = metaspace_tokenizer() if family == "metaspace" else byte_level_tokenizer()
    vocab = METASPACE_VOCAB if family == "metaspace" else BYTE_LEVEL_VOCAB
    token_text = TokenText(tokenizer, len(vocab))
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(vocab), size=int(rng.integers(1, 12)))
        text, ends = token_text.decode_with_offsets(ids)
        slow_text, slow_ends = token_text._decode_incrementally(ids.tolist())
        assert (text, ends.tolist()) == (slow_text, slow_ends.tolist())
        assert np.all(np.diff(ends) >= 0) and ends[-1] == len(text)
        if not text.endswith("\ufffd"):
            assert text == tokenizer.decode(ids.tolist())


def test_embedded_model_offsets(backend: TorchBackend) -> None:
    token_text = TokenText(backend.tokenizer, backend.vocab_size)
    for sample in ["Tom has 12 apples and 34 pears: 46.", "Le café coûte 3 €, 12 × 4 = 48 🙂"]:
        ids = token_text.encode_text(sample)
        text, ends = token_text.decode_with_offsets(ids)
        assert text == sample
        assert ends[-1] == len(text) and np.all(np.diff(ends) >= 0)
        # Every token ends exactly where the decoded prefix of the response ends.
        for k in range(len(ids)):
            prefix = backend.tokenizer.decode(ids[: k + 1].tolist())
            if not prefix.endswith("\ufffd"):
                assert text[: ends[k]] == prefix
