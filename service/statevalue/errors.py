"""The one table from refusals to wire statuses: both front ends answer through it.

Every error a request can meet below the front ends maps here to an HTTP status, a gRPC
code, the field it names (if any) and a retry hint, so HTTP and gRPC never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from statevalue.admin import ReloadRefused, Unauthenticated
from statevalue.backends.base import CheckpointRefused, WeightLoadFailed
from statevalue.numca_store import StoreUnavailable
from statevalue.scheduler import DeadlineExpired, ModelTooOld, NotAccepting, QueueFull
from statevalue.schema import InvalidRequest
from statevalue.weight_receiver import NotOnTrainerHost, WeightTransferFailed

# Most characters of a message a reply carries: messages may quote caller strings (ids,
# keys, texts), and a gRPC status travels in metadata, which is limited to a few KiB.
MAX_MESSAGE_CHARS = 1000


def cut(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text``, shortened to ``limit`` characters with a mark when it is longer."""
    return text if len(text) <= limit else text[: limit - 16] + " ... (shortened)"


@dataclass(frozen=True)
class ErrorReply:
    """How one refusal answers on both wires."""

    http_status: int
    grpc_code: grpc.StatusCode
    message: str
    field: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        # Cut here, so that no reply, whoever builds it, carries a caller's megabytes.
        object.__setattr__(self, "message", cut(self.message))
        if self.field is not None:
            object.__setattr__(self, "field", cut(self.field, 200))

    @property
    def details(self) -> str:
        """The gRPC status details: the field first, as ``field: message``."""
        return f"{self.field}: {self.message}" if self.field else self.message


def error_reply(exc: BaseException) -> ErrorReply | None:
    """The reply for a known refusal; None for anything else (an internal error)."""
    if isinstance(exc, InvalidRequest):
        return ErrorReply(400, grpc.StatusCode.INVALID_ARGUMENT, exc.message, exc.field)
    if isinstance(exc, QueueFull):
        return ErrorReply(
            429, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), retry_after=exc.retry_after
        )
    if isinstance(exc, StoreUnavailable):
        return ErrorReply(503, grpc.StatusCode.UNAVAILABLE, str(exc), retry_after=1.0)
    if isinstance(exc, NotAccepting):
        return ErrorReply(503, grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, DeadlineExpired):
        return ErrorReply(504, grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, ModelTooOld):
        return ErrorReply(
            409, grpc.StatusCode.FAILED_PRECONDITION, str(exc), field="min_model_revision"
        )
    if isinstance(exc, Unauthenticated):
        return ErrorReply(401, grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if isinstance(exc, NotOnTrainerHost):
        return ErrorReply(409, grpc.StatusCode.FAILED_PRECONDITION, str(exc), field="shared_memory")
    if isinstance(exc, (WeightTransferFailed, WeightLoadFailed)):
        return ErrorReply(409, grpc.StatusCode.ABORTED, str(exc))
    if isinstance(exc, ReloadRefused):
        return ErrorReply(exc.http_status, exc.grpc_code, str(exc))
    if isinstance(exc, CheckpointRefused):
        return ErrorReply(400, grpc.StatusCode.INVALID_ARGUMENT, str(exc), field="checkpoint")
    return None
