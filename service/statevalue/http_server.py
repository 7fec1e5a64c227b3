"""HTTP front end (people and debugging): FastAPI with JSON, OpenAPI at /docs, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from statevalue import __version__
from statevalue.admin import Unauthenticated, check_api_token
from statevalue.api_models import (
    EstimateIn,
    EstimateOut,
    HistoryEntryOut,
    HistoryItemOut,
    ModelInfoOut,
    ModelOut,
    ReloadIn,
    estimate_body,
)
from statevalue.errors import ErrorReply, cut, error_reply
from statevalue.metrics import Metrics
from statevalue.request_ids import HEADER, request_id
from statevalue.schema import InvalidRequest

log = logging.getLogger(__name__)

_T = TypeVar("_T")
# The debug page: plain HTML, CSS and JavaScript shipped inside the package.
UI_DIRECTORY = Path(__file__).resolve().parent / "ui"
# nginx's code for "client closed the request": logged and counted, never sent.
CLIENT_CLOSED = 499


def _error(status: int, field: str | None, message: str, **headers: str) -> JSONResponse:
    detail: dict[str, Any] = {"message": message}
    if field is not None:
        detail["field"] = field
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _reply(reply: ErrorReply) -> JSONResponse:
    headers = {}
    if reply.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(reply.retry_after)))
    return _error(reply.http_status, reply.field, reply.message, **headers)


def _request_timeout(header: str | None) -> float | None:
    """Seconds left for the request from the ``x-request-timeout`` header; None if unset."""
    if not header:
        return None
    try:
        seconds = float(header)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidRequest(
            "x-request-timeout", f"must be a positive number of seconds, not {header[:40]!r}"
        )
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


# A 422 lists at most this many schema errors, and quotes a caller's input only when its
# JSON is this short: a bad body of megabytes must not come back in the reply.
_SHOWN_SCHEMA_ERRORS = 20
_SHOWN_INPUT_CHARS = 200


def _schema_errors(errors: Any) -> list[dict[str, Any]]:
    """FastAPI's 422 detail, safe to send: at most 20 errors, long names cut, and the
    caller's input quoted only when it is short and finite (NaN cannot be JSON)."""
    shown = []
    for error in list(errors)[:_SHOWN_SCHEMA_ERRORS]:
        item: dict[str, Any] = {
            "type": error["type"],
            "loc": [cut(p, 100) if isinstance(p, str) else p for p in error["loc"]],
            "msg": cut(str(error["msg"])),
        }
        try:
            quoted = json.dumps(jsonable_encoder(error.get("input")), allow_nan=False)
        except (TypeError, ValueError):
            quoted = None
        if quoted is not None and len(quoted) <= _SHOWN_INPUT_CHARS:
            item["input"] = json.loads(quoted)
        shown.append(item)
    return shown


class TokenFirst:
    """401 for an Estimate without the API token, before its body is read or parsed:
    a caller without the token costs no parsing, and learns nothing about the schema."""

    def __init__(self, app: ASGIApp, server: Any) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/estimate":
            authorization = Headers(scope=scope).get("authorization")
            try:
                check_api_token(authorization, self.server.settings.secret("api_token"))
            except Unauthenticated as exc:
                reply = error_reply(exc)
                assert reply is not None
                await _reply(reply)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# The API routes, counted and logged under these RPC names.
_RPCS = {"/v1/estimate": "estimate", "/v1/admin/reload": "reload", "/v1/model": "model"}


class RequestLog:
    """Every API reply, whatever answered it (a route, validation, the body limit or a
    crash), is counted with its real status, logged once and carries ``X-Request-Id``."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(Headers(scope=scope).get(HEADER))
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = True
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (HEADER.encode(), rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("request_id=%s failed", rid)
            if answered:
                raise
            reply = _error(500, None, f"internal error (request {rid})")
            await reply(scope, receive, send_with_id)
        finally:
            # Under a route prefix (Ray Serve's proxy) the path starts with the root path.
            rpc = _RPCS.get(scope["path"].removeprefix(scope.get("root_path", "")))
            if rpc is not None:
                elapsed = time.perf_counter() - started
                self.metrics.requests.labels("http", rpc, str(status)).inc()
                self.metrics.request_seconds.labels("http", rpc).observe(elapsed)
                log.info(
                    "request_id=%s step_id=%s frontend=http rpc=%s status=%d seconds=%.3f",
                    rid,
                    scope["state"].get("step_id") or "-",
                    rpc,
                    status,
                    elapsed,
                )


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
    # Swagger UI and ReDoc from assets inside the installed package, not a CDN.
    app = FastAPIOffline(
        title="statevalue",
        version=__version__,
        description="Per-token state values (Numca, Hista, group mean) for LLM RL trainers.",
    )

    # Added last, so outermost: it also sees the body limit's 413s and the token's 401s.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(TokenFirst, server=server)
    app.add_middleware(RequestLog, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _schema_errors(exc.errors())}, status_code=422)

    @app.post(
        "/v1/estimate",
        response_model=EstimateOut,
        # An explanation is only sent when asked for, not as null.
        response_model_exclude_none=True,
        responses={
            400: {"description": "a field failed a check; detail names it"},
            401: {"description": "missing or wrong API token (when the server requires one)"},
            429: {"description": "queue full; retry after the Retry-After seconds"},
            503: {"description": "model not ready, or draining for shutdown: retry elsewhere"},
        },
    )
    async def estimate(body: EstimateIn, request: Request) -> Any:
        """Per-token values and advantages for a batch of groups."""
        try:
            # Logged by RequestLog with the request id.
            request.state.step_id = body.step_id
            # A client that disconnects cancels the request, like a gRPC cancel.
            result = await _unless_client_leaves(
                request,
                server.estimate(
                    body.to_request(),
                    request.headers.get("authorization"),
                    _request_timeout(request.headers.get("x-request-timeout")),
                ),
            )
            if result is None:
                return Response(status_code=CLIENT_CLOSED)
        except Exception as exc:
            reply = error_reply(exc)
            if reply is None:
                raise
            return _reply(reply)
        return EstimateOut.from_result(result)

    @app.get(
        "/v1/model",
        response_model=ModelInfoOut,
        responses={503: {"description": "the model is not loaded yet"}},
    )
    async def model() -> Any:
        """The served model: name, content version, limits and default parameters."""
        info = server.model_info()
        if info is None:
            return _error(503, None, "the model is not loaded yet")
        return info

    debug_responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "missing or wrong API token (when the server requires one)"},
        404: {"description": "the history is off (no --debug-history), or no such entry"},
    }

    def history_or_reply(request: Request) -> Any:
        """The server's debug history, or the error response to send instead."""
        try:
            history = server.debug_history(request.headers.get("authorization"))
        except Exception as exc:
            reply = error_reply(exc)
            if reply is None:
                raise
            return _reply(reply)
        if history is None:
            return _error(404, None, "the debug history is off: start with --debug-history N")
        return history

    @app.get(
        "/v1/debug/history",
        response_model=list[HistoryItemOut],
        responses=debug_responses,
    )
    async def debug_history(request: Request) -> Any:
        """The Estimate requests the server kept for the debug page, newest first."""
        history = history_or_reply(request)
        if isinstance(history, Response):
            return history
        return [
            HistoryItemOut(
                id=entry.id,
                time=entry.time,
                groups=len(entry.request.groups),
                rollouts=sum(len(g.rollouts) for g in entry.request.groups),
                methods=list(entry.request.methods),
                model=ModelOut(
                    name=entry.result.model.name,
                    version=entry.result.model.version,
                    revision=entry.result.model.revision,
                ),
            )
            for entry in history.entries()
        ]

    @app.get(
        "/v1/debug/history/{entry_id}",
        response_model=HistoryEntryOut,
        response_model_exclude_none=True,
        responses=debug_responses,
    )
    async def debug_history_entry(entry_id: int, request: Request) -> Any:
        """One kept request (as the JSON of POST /v1/estimate) and its answer, explained."""
        history = history_or_reply(request)
        if isinstance(history, Response):
            return history
        entry = history.get(entry_id)
        if entry is None:
            return _error(404, None, f"no kept request {entry_id} (dropped, or never kept)")
        return HistoryEntryOut(
            id=entry.id,
            time=entry.time,
            request=estimate_body(entry.request),
            response=EstimateOut.from_result(entry.result),
        )

    @app.get("/ui", include_in_schema=False)
    async def ui_redirect() -> RedirectResponse:
        # Relative, so the page's relative asset and API URLs work under a path prefix too.
        return RedirectResponse("ui/")

    app.mount("/ui", StaticFiles(directory=UI_DIRECTORY, html=True), name="ui")

    @app.post(
        "/v1/admin/reload",
        response_model=ModelInfoOut,
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
        try:
            await server.reload(
                body.checkpoint, body.version or None, request.headers.get("authorization")
            )
        except Exception as exc:
            reply = error_reply(exc)
            if reply is None:
                raise
            return _reply(reply)
        return server.model_info()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process answers (always 200; use /livez for a liveness probe)."""
        return {"status": "alive"}

    @app.get("/livez", responses={503: {"description": "the batcher is stuck or stopped"}})
    async def livez() -> Any:
        """Liveness: 503 once the batcher died or a forward step hangs past the stall limit.

        A blocked event loop fails it too: the probe gets no answer.
        """
        scheduler = server.scheduler
        problem = None if scheduler is None else scheduler.stalled(server.settings.liveness_stall_s)
        if problem:
            return _error(503, None, problem)
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Any:
        """Readiness: the model is loaded and warmed, the server accepts work and its Numca
        store answers."""
        problem = await server.not_ready()
        if problem is None:
            return {"status": "ready"}
        return _error(503, None, problem)

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics."""
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
