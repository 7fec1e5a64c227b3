"""The one place model settings become a loaded backend (``serve``, ``estimate``,
``calibrate`` and the Ray Serve deployment all load through it)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from statevalue.backends.base import ModelBackend

if TYPE_CHECKING:
    from statevalue.settings import ModelSettings

log = logging.getLogger(__name__)


def open_backend(settings: ModelSettings) -> ModelBackend:
    """Load the model ``settings`` name on the backend they choose (blocking: seconds to
    minutes)."""
    started = time.perf_counter()
    backend: ModelBackend
    if settings.backend == "none":
        from statevalue.backends.no_model import NoModelBackend

        backend = NoModelBackend(settings.model)
    elif settings.backend == "vllm":
        from statevalue.backends.vllm_backend import VllmBackend

        backend = VllmBackend(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            layer=settings.layer,
            forward_path=settings.forward_path,
            memory_share=settings.vllm_memory_share,
            enforce_eager=settings.vllm_enforce_eager,
        )
    else:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(
            settings.model,
            device=settings.device,
            dtype=settings.dtype,
            layer=settings.layer,
            max_batch_tokens=settings.max_batch_tokens,
            forward_path=settings.forward_path,
        )
    log.info(
        "model %s %s loaded on %s in %.1f s",
        backend.identity.name,
        backend.identity.version,
        settings.backend,
        time.perf_counter() - started,
    )
    return backend
