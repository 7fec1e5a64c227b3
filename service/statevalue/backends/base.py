"""The model backend interface the engine and scheduler program against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced the hidden states.

    ``version`` is derived from the weights' files (or given by the trainer on reload);
    ``revision`` counts weight reloads since the server started, so "at least revision N"
    is a simple comparison.
    """

    name: str
    version: str
    revision: int = 0


@dataclass(frozen=True)
class LoadedWeights:
    """A checkpoint's tensors, read and checked, ready to swap into the running model."""

    tensors: dict[str, torch.Tensor]
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

    def hidden_states(
        self, sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int] | None = None
    ) -> list[torch.Tensor]:
        """Hidden states of the configured layer: one (len(seq), hidden) tensor per sequence.

        The tensors stay on the model's device in its dtype (bfloat16 on a GPU by default);
        consumers upcast where they need float32. ``prefix_lengths[i]``, when given, is the
        length of sequence i's prompt, which other sequences of the call (the rest of its
        group) may share: a hint a backend may use to run that prompt once. It never
        changes the result.
        """
        ...

    def read_checkpoint(self, checkpoint: str) -> LoadedWeights:
        """Load a checkpoint directory's weights into memory, checked against the model."""
        ...

    def apply_weights(self, weights: LoadedWeights, version: str | None = None) -> ModelIdentity:
        """Swap in weights from ``read_checkpoint``; returns the new identity."""
        ...
