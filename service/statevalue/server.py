"""One process, one engine, two front ends: the life cycle of ``statevalue serve``.

Start-up: both front ends listen at once (liveness answers, readiness says no), the model
loads and warms on a worker thread, then health turns SERVING. SIGTERM: stop accepting,
health NOT_SERVING, drain accepted work, stop the front ends — all within the grace period:
requests the drain cannot finish in time are answered 503 / UNAVAILABLE ("draining").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import ssl
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health, health_pb2

from statevalue.admin import ReloadRefused, check_admin, check_api_token
from statevalue.backends.base import LoadedWeights, ModelBackend
from statevalue.backends.factory import open_backend
from statevalue.config import load_params
from statevalue.debug_history import DebugHistory
from statevalue.engine import Engine
from statevalue.grpc_server import SERVICE_NAME, ValueServicer, build_grpc_server
from statevalue.http_server import create_app
from statevalue.metrics import Metrics
from statevalue.numca_store import open_numca_store
from statevalue.scheduler import DRAINING, NotAccepting, Scheduler
from statevalue.schema import EstimateRequest, EstimateResult, InvalidRequest
from statevalue.settings import ServerSettings
from statevalue.weight_receiver import UpdateOrder, WeightReceiver

log = logging.getLogger(__name__)

# How long an update may wait for the trainer when its call has no deadline.
_WEIGHT_TIMEOUT_S = 600.0

# The part of the shutdown grace kept for sending the last answers after the drain.
_SEND_RESERVE_S = 2.0

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def open_scheduler(
    settings: ServerSettings, metrics: Metrics, backend: ModelBackend | None = None
) -> Scheduler:
    """Load the model (unless ``backend`` is given), build the engine, start a scheduler.

    The model loads on a worker thread, so the event loop keeps answering meanwhile. Every
    front end over one model (this server, the Ray Serve deployment) starts here.
    """
    if backend is None:
        # Not asyncio's default executor: asyncio.run waits for that one's threads on the
        # way out, so a SIGTERM during a load would wait for the whole load (minutes for a
        # large model) after the server said it stopped.
        loader = ThreadPoolExecutor(1, thread_name_prefix="statevalue-load")
        try:
            backend = await asyncio.get_running_loop().run_in_executor(
                loader, open_backend, settings
            )
        finally:
            loader.shutdown(wait=False)
    engine = await asyncio.to_thread(
        Engine,
        backend,
        numca_store=open_numca_store(
            settings.numca_store,
            settings.numca_max_prompts,
            settings.numca_ttl_s,
            settings.numca_snapshot,
        ),
        max_groups=settings.max_groups_per_request,
        max_tokens=settings.max_request_tokens,
        defaults=None if settings.params_file is None else load_params(settings.params_file),
        layer=settings.layer,
    )
    if settings.params_file is not None:
        log.info(
            "default params from %s: %s",
            settings.params_file,
            json.dumps(engine.defaults.model_dump(mode="json", exclude_unset=True)),
        )
    scheduler = Scheduler(
        engine,
        metrics,
        max_batch_tokens=settings.max_batch_tokens,
        micro_batch_seconds=settings.micro_batch_seconds,
        max_wait_s=settings.max_wait_ms / 1000,
        max_queue_requests=settings.max_queue_requests,
        max_queue_tokens=settings.max_queue_tokens,
        max_queue_wait_s=settings.max_queue_wait_s,
    )
    metrics.watch_numca_store(engine.numca_store.stats)
    log.info("Numca tables: %s", engine.numca_store.describe())
    # Without a model there is no forward pass to warm.
    await scheduler.start(warmup=settings.warmup and backend.kind != "none")
    metrics.set_model(backend.identity.name, backend.identity.version)
    return scheduler


class PortUnavailable(ValueError):
    """A port the settings name cannot be listened on (taken, or not allowed)."""


def _bind(host: str, port: int, flag: str) -> socket.socket:
    """A socket bound to ``host:port``; a port that cannot be had is named with its flag."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PortUnavailable(
            f"{flag} {port}: cannot listen on {host}:{port} ({exc.strerror})"
        ) from None
    return sock


class _HttpServer(uvicorn.Server):
    """uvicorn without signal handlers of its own.

    uvicorn would close the HTTP front end the moment SIGTERM arrives; here the signal goes
    to :func:`serve`, which keeps /healthz, /readyz (503) and /metrics answering while
    accepted work drains, and stops HTTP last.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StatevalueServer:
    """The gRPC and HTTP servers over one scheduler and engine.

    Args:
        settings: the server settings.
        backend: an already loaded backend (tests share one); by default the server loads
            ``settings.model`` itself after it starts listening.
    """

    def __init__(self, settings: ServerSettings, backend: ModelBackend | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.scheduler: Scheduler | None = None
        self.grpc_port = 0
        self.http_port = 0
        self._backend = backend
        self._engine: Engine | None = None
        self._stopping = False
        self._history = DebugHistory(settings.debug_history) if settings.debug_history else None
        max_bytes = settings.max_message_mb << 20
        # Built by start(): a server that only loads (under Ray Serve) has no gRPC port.
        self._grpc: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        #: The HTTP API over this server (uvicorn serves it here; Ray Serve's proxy there).
        self.app = create_app(self, self.metrics, max_body_bytes=max_bytes)
        tls: dict[str, Any] = {}
        if settings.tls_cert is not None:
            tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca is not None:
                tls["ssl_ca_certs"] = str(settings.tls_client_ca)
                tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        self._http = _HttpServer(
            uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", **tls)
        )
        self._http_task: asyncio.Task[None] | None = None
        self._reload_lock = asyncio.Lock()
        self._weights = WeightReceiver()
        self._load_task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return not self._stopping and self.scheduler is not None and self.scheduler.accepting

    async def not_ready(self) -> str | None:
        """Why the server is not ready now (None when it is): not loaded yet, draining, or
        the Numca store does not answer (a request with a prompt_id would get 503)."""
        if self._stopping:
            return "draining"
        if not self.ready or self._engine is None:
            return "not ready"
        store = self._engine.numca_store
        if not await asyncio.to_thread(store.ping):
            return f"the Numca store {store.describe()} does not answer"
        return None

    @property
    def draining(self) -> bool:
        """SIGTERM arrived: accepted work drains, new work gets 503 / UNAVAILABLE."""
        return self._stopping

    def model_info(self) -> dict[str, Any] | None:
        if self._engine is None:
            return None
        backend = self._engine.backend
        return {
            "name": backend.identity.name,
            "version": backend.identity.version,
            "vocab_size": backend.vocab_size,
            "max_length": backend.max_length,
            "hidden_size": int(getattr(backend, "hidden_size", 0)),
            "device": str(backend.device),
            "revision": backend.identity.revision,
            "max_request_tokens": self._engine.max_tokens,
            "max_request_groups": self._engine.max_groups,
            # What the params file set; every other field is the built-in default.
            "default_params": self._engine.defaults.model_dump(mode="json", exclude_unset=True),
            "backend": backend.kind,
            "forward_path": str(backend.forward_path),
            "tokens_per_second": (self.scheduler.tokens_per_second or 0.0)
            if self.scheduler is not None
            else 0.0,
        }

    async def estimate(
        self, request: EstimateRequest, authorization: str | None, timeout: float | None
    ) -> EstimateResult:
        """One Estimate from either front end.

        Raises:
            Unauthenticated, NotAccepting (not ready yet, or draining), and whatever
            :meth:`Scheduler.submit` raises.
        """
        check_api_token(authorization, self.settings.secret("api_token"))
        scheduler = self.scheduler
        if self._stopping:
            raise NotAccepting(DRAINING)
        if scheduler is None or not scheduler.accepting:
            raise NotAccepting("the model is not ready")
        if self._history is None:
            return await scheduler.submit(request, timeout=timeout)
        # Kept requests carry their explanations, for the debug page to show.
        result = await scheduler.submit(dataclasses.replace(request, explain=True), timeout=timeout)
        self._history.record(request, result)
        return result if request.explain else _without_explanations(result)

    def debug_history(self, authorization: str | None) -> DebugHistory | None:
        """The kept requests (None when the history is off); the API token guards them.

        Raises:
            Unauthenticated: an API token is set and the caller did not send it.
        """
        if self._history is None:
            return None
        check_api_token(authorization, self.settings.secret("api_token"))
        return self._history

    async def reload(self, checkpoint: str, version: str | None, authorization: str | None) -> None:
        """Authenticated weight reload from a checkpoint directory.

        Raises:
            ReloadRefused (disabled, wrong token, model not loaded yet), or CheckpointRefused
            (a checkpoint that cannot be read or does not fit the model).
        """
        scheduler = self._admin_scheduler(authorization)
        async with self._reload_lock:
            identity = await scheduler.reload(checkpoint, version)
        self.metrics.set_model(identity.name, identity.version)

    def _admin_scheduler(self, authorization: str | None) -> Scheduler:
        """The scheduler, for a caller with the admin token once the model is loaded."""
        check_admin(authorization, self.settings.secret("admin_token"))
        if self.scheduler is None:
            raise ReloadRefused(
                "the model is not loaded yet",
                http_status=503,
                grpc_code=grpc.StatusCode.UNAVAILABLE,
            )
        return self.scheduler

    async def update_weights(
        self, order: UpdateOrder, authorization: str | None, timeout: float | None
    ) -> None:
        """Authenticated weight update from the trainer's memory (``order`` says where its
        group meets and what it sends): received into a staged copy, then swapped in.

        Raises:
            ReloadRefused, InvalidRequest (tensors that do not fit, naming one),
            NotOnTrainerHost (shared memory from another host), WeightTransferFailed
            (the old weights keep serving).
        """
        scheduler = self._admin_scheduler(authorization)
        update = asyncio.ensure_future(
            self._receive_weights(scheduler, order, timeout or _WEIGHT_TIMEOUT_S)
        )
        # Its failure is logged below; a caller that went away no longer asks for it.
        update.add_done_callback(lambda done: done.cancelled() or done.exception())
        # A trainer that goes away cancels the call, not the update: it fails on its own
        # (the transfer breaks), and the next update waits until it has.
        await asyncio.shield(update)

    async def _receive_weights(
        self, scheduler: Scheduler, order: UpdateOrder, timeout: float
    ) -> None:
        try:
            await self._update_from(scheduler, order, timeout)
        except Exception as exc:
            # Logged here: the trainer may be gone and never see the answer.
            log.warning("weight update %d failed: %s", order.update, exc)
            raise

    async def _update_from(self, scheduler: Scheduler, order: UpdateOrder, timeout: float) -> None:
        backend = scheduler.engine.backend
        async with self._reload_lock:
            try:
                dtypes = backend.weight_dtypes({spec.name: spec.shape for spec in order.tensors})
            except NotImplementedError as exc:
                raise ReloadRefused(
                    str(exc), http_status=501, grpc_code=grpc.StatusCode.UNIMPLEMENTED
                ) from exc
            except ValueError as exc:
                raise InvalidRequest("tensors", str(exc)) from exc
            order.check_device(backend.device)
            loop = asyncio.get_running_loop()
            staged = await loop.run_in_executor(
                self._weights.thread, self._weights.receive, order, dtypes, backend.device, timeout
            )
            self.metrics.weight_update_bytes.labels(order.TRANSPORT).inc(order.nbytes)
            identity = await scheduler.apply_weights(LoadedWeights(staged, order.version))
        self.metrics.set_model(identity.name, identity.version)

    async def start(self) -> None:
        """Listen on both ports and begin loading the model; returns before it is ready."""
        host = self.settings.host
        self._grpc, self._health = build_grpc_server(
            ValueServicer(self, self.metrics),
            max_message_bytes=self.settings.max_message_mb << 20,
            max_connection_age_s=self.settings.max_connection_age_s,
        )
        await self._set_health(NOT_SERVING)
        grpc_port = self.settings.grpc_port
        credentials = self._grpc_credentials()
        # Both ports are checked before either serves, so a taken one leaves nothing open.
        if grpc_port:
            _bind(host, grpc_port, "--grpc-port").close()
        sock = _bind(host, self.settings.http_port, "--http-port")
        address = f"{host}:{grpc_port}"
        try:
            if credentials is None:
                self.grpc_port = self._grpc.add_insecure_port(address)
            else:
                self.grpc_port = self._grpc.add_secure_port(address, credentials)
        except RuntimeError:
            # Taken in the moment since the check above.
            sock.close()
            raise PortUnavailable(f"--grpc-port {grpc_port}: cannot listen on {address}") from None
        await self._grpc.start()
        self.http_port = sock.getsockname()[1]
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]))
        log.info(
            "listening%s: grpc %s:%d, http %s:%d",
            " with TLS" if credentials is not None else "",
            host,
            self.grpc_port,
            host,
            self.http_port,
        )
        self._load_task = asyncio.create_task(self.load())

    def _grpc_credentials(self) -> grpc.ServerCredentials | None:
        settings = self.settings
        if settings.tls_cert is None or settings.tls_key is None:
            return None
        client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    async def wait_ready(self) -> None:
        """Wait until the model is loaded and warmed (re-raises a load failure)."""
        assert self._load_task is not None, "start() first"
        await self._load_task

    async def load(self) -> None:
        """Load and warm the model and start the scheduler; :meth:`start` runs this after
        opening the ports, the Ray Serve deployment (whose proxy listens) alone."""
        scheduler = await open_scheduler(self.settings, self.metrics, self._backend)
        self._engine = scheduler.engine
        self.scheduler = scheduler
        backend = scheduler.engine.backend
        if not self._stopping:
            await self._set_health(SERVING)
            log.info("ready: %s %s", backend.identity.name, backend.identity.version)

    async def _set_health(self, status: int) -> None:
        if self._health is None:
            return
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> bool:
        """Stop accepting, drain accepted work, close both front ends; True if all drained.

        Everything ends within ``grace`` seconds (the settings' by default): the drain gets
        most of it, the front ends the rest to send the last answers.
        """
        grace = self.settings.shutdown_grace_s if grace is None else grace
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        self._stopping = True
        await self._set_health(NOT_SERVING)
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
        drained = True
        if self.scheduler is not None:
            drained = await self.scheduler.drain(grace - min(_SEND_RESERVE_S, grace / 4))
        await asyncio.to_thread(self._weights.close)
        if self._engine is not None:
            # After the drain, so a memory store's snapshot holds everything answered.
            await asyncio.to_thread(self._engine.numca_store.close)
            if self._backend is None:
                # Loaded here, so closed here (a vLLM engine process would outlive us).
                await asyncio.to_thread(self._engine.backend.close)
        left = max(end - loop.time(), 0.1)
        if self._grpc is not None:
            await self._grpc.stop(grace=left)
        self._http.config.timeout_graceful_shutdown = max(end - loop.time(), 0.1)
        self._http.should_exit = True
        if self._http_task is not None:
            await self._http_task
        log.info("stopped (%s)", "drained" if drained else "drain timed out")
        return drained


def _without_explanations(result: EstimateResult) -> EstimateResult:
    """``result`` as a caller that did not ask for explanations gets it."""
    return dataclasses.replace(
        result,
        groups=[
            dataclasses.replace(
                group,
                rollouts=[dataclasses.replace(r, explanation=None) for r in group.rollouts],
            )
            for group in result.groups
        ],
    )


async def serve(settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = StatevalueServer(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    load = asyncio.create_task(server.wait_ready())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        await server.stop(grace=0)
        raise load.exception()  # type: ignore[misc]
    await stopped
    log.info("shutting down")
    await server.stop()
