"""The model backend interface the engine and scheduler program against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced the hidden states: a name and a content-derived version."""

    name: str
    version: str


class ModelBackend(Protocol):
    """A policy model that returns hidden states for whole prompt+response sequences."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (ids, offsets, chat template)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_length(self) -> int:
        """Longest prompt+response sequence the model accepts."""
        ...

    @property
    def device(self) -> torch.device: ...

    def hidden_states(self, sequences: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Hidden states of the configured layer: one (len(seq), hidden) tensor per sequence."""
        ...
