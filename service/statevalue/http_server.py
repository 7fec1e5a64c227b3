"""HTTP front end (people and debugging): FastAPI with JSON, OpenAPI at /docs, /metrics."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from statevalue import __version__
from statevalue.api_models import EstimateIn, EstimateOut
from statevalue.metrics import Metrics
from statevalue.scheduler import DeadlineExpired, NotAccepting, QueueFull
from statevalue.schema import InvalidRequest

log = logging.getLogger(__name__)


def _error(status: int, field: str | None, message: str, **headers: str) -> JSONResponse:
    detail: dict[str, Any] = {"message": message}
    if field is not None:
        detail["field"] = field
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def create_app(server: Any, metrics: Metrics, *, max_body_bytes: int) -> FastAPI:
    """The HTTP API over ``server`` (a StatevalueServer: scheduler, model info, readiness)."""
    app = FastAPI(
        title="statevalue",
        version=__version__,
        description="Per-token state values (Numca, Hista, group mean) for LLM RL trainers.",
    )

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return _error(413, None, f"request body over the {max_body_bytes}-byte limit")
        return await call_next(request)

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
            timeout = request.headers.get("x-request-timeout")
            try:
                result = await scheduler.submit(
                    body.to_request(), timeout=float(timeout) if timeout else None
                )
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
            return EstimateOut.from_result(result)
        finally:
            elapsed = time.perf_counter() - started
            metrics.requests.labels("http", "estimate", str(status)).inc()
            metrics.request_seconds.labels("http", "estimate").observe(elapsed)
            log.info(
                "request_id=%s frontend=http rpc=estimate status=%d groups=%d seconds=%.3f",
                request_id,
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
