"""The model backend interface the engine and scheduler program against."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)

_T = TypeVar("_T")


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


class CheckpointRefused(Exception):
    """A checkpoint the served model cannot take: missing, unreadable or corrupt files, or
    weights whose names or shapes do not fit. The message names the checkpoint."""


class WeightLoadFailed(Exception):
    """The backend could not load new weights; the message says which it serves now (the
    old ones, or those it could restore)."""


def read_safetensors(file: Path, read: Callable[[str], _T]) -> _T:
    """``read(file)`` with a missing, unreadable or corrupt file raised as CheckpointRefused."""
    from safetensors import SafetensorError

    try:
        return read(str(file))
    except (OSError, SafetensorError) as exc:
        raise CheckpointRefused(f"{file}: not a readable safetensors file ({exc})") from exc


@dataclass(frozen=True)
class LoadedWeights:
    """A checkpoint's tensors, read and checked, ready to swap into the running model.

    A backend whose model runs elsewhere (vLLM's engine process) reads the files itself:
    it leaves ``tensors`` empty and keeps the checked directory in ``source``.
    """

    tensors: dict[str, torch.Tensor]
    version: str
    source: Path | None = None


class LoadedModelInfo:
    """What every backend reports about its loaded model, and the revision bump of a reload.

    A backend sets ``_device`` and ``_dtype`` and calls ``_describe_model`` once its
    tokenizer and config are loaded.
    """

    _device: torch.device
    _dtype: torch.dtype

    def _describe_model(self, name: str, version: str, tokenizer: Any, config: Any) -> None:
        self._identity = ModelIdentity(name=name, version=version)
        self._tokenizer = tokenizer
        self._hidden_size = int(config.hidden_size)
        # Added tokens can lie past the embedding matrix's rows.
        self._vocab_size = max(int(config.vocab_size), len(tokenizer))
        self._max_length = int(getattr(config, "max_position_embeddings", 0) or 2048)

    def _next_revision(self, version: str) -> ModelIdentity:
        """The identity after a reload to ``version``: same name, revision + 1."""
        self._identity = ModelIdentity(
            name=self._identity.name, version=version, revision=self._identity.revision + 1
        )
        log.info("weights reloaded: %s revision %d", version, self._identity.revision)
        return self._identity

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype, which is also the dtype of the hidden states it returns."""
        return self._dtype


class ModelBackend(Protocol):
    """A policy model that returns hidden states for whole prompt+response sequences."""

    #: Which implementation answers: "torch" or "vllm" (model info reports it).
    kind: str

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def forward_path(self) -> str:
        """How sequences go through the model (docs/design.md, "Forward paths")."""
        ...

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
        """Load a checkpoint directory's weights into memory, checked against the model.

        Raises:
            CheckpointRefused: the checkpoint cannot be loaded into this model.
        """
        ...

    def weight_dtypes(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.dtype]:
        """The model's dtype of each weight the trainer will send from memory.

        Raises ValueError naming a tensor that does not fit, NotImplementedError on a
        backend that takes new weights from checkpoint files only.
        """
        ...

    def apply_weights(self, weights: LoadedWeights, version: str | None = None) -> ModelIdentity:
        """Swap in weights from ``read_checkpoint`` or sent from memory; returns the new
        identity."""
        ...

    def close(self) -> None:
        """Release what the model holds outside this process (engine processes); idempotent."""
        ...
