"""TorchBackend on the real embedded model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from statevalue.backends.torch_backend import (
    TorchBackend,
    directory_stamp,
    plan_batches,
    resolve_dtype,
)


def test_identity_names_the_embedded_model(
    backend: TorchBackend, embedded_checkpoint: Path
) -> None:
    # The exported checkpoint's directory carries the model's name; its version is the
    # directory's stamp (the GGUF file's q4_1 version: tests/test_cli.py).
    assert backend.identity.name == "SmolLM2-135M-Instruct"
    assert backend.identity.version == directory_stamp(embedded_checkpoint)
    assert backend.vocab_size == 49152
    assert backend.max_length == 8192


def test_batched_hidden_states_equal_one_by_one(backend: TorchBackend) -> None:
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 1000, size=n).astype(np.int32) for n in (7, 30, 12, 30, 1)]
    batched = backend.hidden_states(sequences)
    for seq, states in zip(sequences, batched, strict=True):
        alone = backend.hidden_states([seq])[0]
        assert states.shape == (len(seq), 576)
        assert states.dtype == torch.float32
        torch.testing.assert_close(states, alone, atol=2e-4, rtol=1e-4)


def test_plan_batches_respects_token_budget() -> None:
    lengths = [10, 50, 20, 50, 5, 200]
    batches = plan_batches(lengths, max_batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert width * len(batch) <= 100 or len(batch) == 1
    assert [5] in batches  # the over-budget sequence runs alone


def test_auto_dtype_is_float32_on_cpu() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_generate_stops_at_eos(backend: TorchBackend) -> None:
    prompt = np.asarray(backend.tokenizer("Hello")["input_ids"], dtype=np.int32)
    responses = backend.generate(prompt, 2, max_new_tokens=8, seed=1)
    assert len(responses) == 2
    eos = backend.tokenizer.eos_token_id
    for response in responses:
        assert 1 <= len(response) <= 8
        assert eos not in response[:-1]
