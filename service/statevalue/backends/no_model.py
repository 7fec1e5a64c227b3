"""``--backend none``: a tokenizer and no model weights.

The server then answers Numca and the group mean (which need token ids and their text
only) and Hista from the representations the trainer sends (``statevalue_client.states``);
it needs no GPU and loads in seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from statevalue.backends.base import (
    CheckpointRefused,
    LoadedModelInfo,
    LoadedWeights,
    ModelIdentity,
)
from statevalue.backends.torch_backend import TorchBackend

log = logging.getLogger(__name__)

# Without a model config there is no context limit beyond the request limits.
_NO_CONTEXT_LIMIT = 2**31 - 1
_NO_MODEL = "this server runs no model (backend none)"


class NoModelBackend(LoadedModelInfo):
    """A tokenizer only: ``model`` is "embedded", a model or tokenizer directory, or a .gguf
    file. The model's config is read when there is one (vocabulary size, context length and
    hidden size); its weights never are."""

    kind = "none"
    forward_path = "none"

    def __init__(self, model: str) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self._device = torch.device("cpu")
        self._dtype = torch.float32
        source, kwargs, name, version = TorchBackend.locate(model)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        try:
            config: Any = AutoConfig.from_pretrained(source, **kwargs)
        except (OSError, ValueError):
            log.info("no model config beside the tokenizer: vocabulary from the tokenizer")
            config = SimpleNamespace(
                hidden_size=0,
                vocab_size=len(tokenizer),
                max_position_embeddings=_NO_CONTEXT_LIMIT,
            )
        self._describe_model(name, version, tokenizer, config)
        log.info("backend none: tokenizer of %s (%s), no model weights", name, version)

    def hidden_states(
        self, sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        raise RuntimeError(f"{_NO_MODEL}: hidden states must come with the request")

    def read_checkpoint(self, checkpoint: str) -> LoadedWeights:
        raise CheckpointRefused(f"{_NO_MODEL}: there are no weights to reload")

    def staging_weights(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{_NO_MODEL}: there are no weights to update")

    def apply_weights(self, weights: LoadedWeights, version: str | None = None) -> ModelIdentity:
        raise CheckpointRefused(f"{_NO_MODEL}: there are no weights to reload")

    def close(self) -> None:
        """Nothing is held outside this process."""
