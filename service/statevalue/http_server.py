"""HTTP front end (people and debugging): FastAPI with JSON, OpenAPI at /docs, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from statevalue import __version__
from statevalue.admin import ReloadRefused
from statevalue.api_models import EstimateIn, EstimateOut, ReloadIn
from statevalue.metrics import Metrics
from statevalue.scheduler import DeadlineExpired, ModelTooOld, NotAccepting, QueueFull
from statevalue.schema import InvalidRequest

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# nginx's code for "client closed the request": logged and counted, never sent.
CLIENT_CLOSED = 499


def _error(status: int, field: str | None, message: str, **headers: str) -> JSONResponse:
    detail: dict[str, Any] = {"message": message}
    if field is not None:
        detail["field"] = field
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _request_timeout(header: str | None) -> float | None:
    """Seconds left for the request from the ``x-request-timeout`` header; None if unset."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"must be a positive number of seconds, not {header!r}")
    return seconds


async def _client_gone(request: Request) -> None:
    """Return once the client has closed the connection (the body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[_T]) -> _T | None:
    """``work``'s result, or None (and ``work`` cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


class BodyLimit:
    """413 for request bodies over ``max_bytes``, with or without a Content-Length.

    A body without a length (chunked) is read here, counting, and replayed to the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error(413, None, f"request body over the {self.max_bytes}-byte limit")
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await too_large(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)


def create_app(server: Any, metrics: Metrics, *, max_body_bytes: int) -> FastAPI:
    """The HTTP API over ``server`` (a StatevalueServer: scheduler, model info, readiness)."""
    app = FastAPI(
        title="statevalue",
        version=__version__,
        description="Per-token state values (Numca, Hista, group mean) for LLM RL trainers.",
    )

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.post(
        "/v1/estimate",
        response_model=EstimateOut,
        responses={
            400: {"description": "a field failed a check; detail names it"},
            429: {"description": "queue full; retry after the Retry-After seconds"},
            503: {"description": "model not ready or shutting down"},
        },
    )
    async def estimate(body: EstimateIn, request: Request) -> Any:
        """Per-token values and advantages for a batch of groups."""
        request_id = uuid.uuid4().hex[:12]
        started = time.perf_counter()
        status = 200
        try:
            scheduler = server.scheduler
            if scheduler is None or not scheduler.accepting:
                status = 503
                return _error(503, None, "the model is not ready")
            try:
                timeout = _request_timeout(request.headers.get("x-request-timeout"))
            except ValueError as exc:
                status = 400
                return _error(400, "x-request-timeout", str(exc))
            try:
                # A client that disconnects cancels the request, like a gRPC cancel.
                result = await _unless_client_leaves(
                    request, scheduler.submit(body.to_request(), timeout=timeout)
                )
                if result is None:
                    status = CLIENT_CLOSED
                    return Response(status_code=CLIENT_CLOSED)
            except InvalidRequest as exc:
                status = 400
                return _error(400, exc.field, exc.message)
            except QueueFull as exc:
                status = 429
                return _error(
                    429, None, str(exc), **{"Retry-After": str(int(exc.retry_after) or 1)}
                )
            except NotAccepting as exc:
                status = 503
                return _error(503, None, str(exc))
            except DeadlineExpired as exc:
                status = 504
                return _error(504, None, str(exc))
            except ModelTooOld as exc:
                status = 409
                return _error(409, "min_model_revision", str(exc))
            return EstimateOut.from_result(result)
        finally:
            elapsed = time.perf_counter() - started
            metrics.requests.labels("http", "estimate", str(status)).inc()
            metrics.request_seconds.labels("http", "estimate").observe(elapsed)
            log.info(
                "request_id=%s step_id=%s frontend=http rpc=estimate status=%d groups=%d "
                "seconds=%.3f",
                request_id,
                body.step_id or "-",
                status,
                len(body.groups),
                elapsed,
            )

    @app.get("/v1/model")
    async def model() -> Any:
        """The served model: name, content version and limits."""
        info = server.model_info()
        if info is None:
            return _error(503, None, "the model is not loaded yet")
        return info

    @app.post(
        "/v1/admin/reload",
        responses={
            400: {"description": "the checkpoint cannot be loaded into this model"},
            401: {"description": "missing or wrong admin token"},
            403: {"description": "reloads are disabled (no --admin-token)"},
        },
    )
    async def reload(body: ReloadIn, request: Request) -> Any:
        """Load new weights from a checkpoint directory on the server; needs the admin token.

        Accepted requests are not dropped; every answer names the weights that produced it.
        """
        status = 200
        try:
            await server.reload(
                body.checkpoint, body.version or None, request.headers.get("authorization")
            )
        except ReloadRefused as exc:
            status = exc.http_status
            return _error(status, None, str(exc))
        except ValueError as exc:
            status = 400
            return _error(400, "checkpoint", str(exc))
        finally:
            metrics.requests.labels("http", "reload", str(status)).inc()
        return server.model_info()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Any:
        """Readiness: the model is loaded and warmed and the server accepts work."""
        if server.ready:
            return {"status": "ready"}
        return _error(503, None, "not ready")

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
