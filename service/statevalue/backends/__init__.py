"""Model backends: turn token sequences into per-token hidden states."""

from statevalue.backends.base import ModelBackend, ModelIdentity
from statevalue.backends.embedded import EMBEDDED_MODEL, embedded_model_file

__all__ = ["EMBEDDED_MODEL", "ModelBackend", "ModelIdentity", "embedded_model_file"]
