"""Real statevalue servers for end-to-end tests: a background event loop, loopback ports."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from statevalue.backends.base import ModelBackend
from statevalue.backends.torch_backend import TorchBackend
from statevalue.schema import GroupInput
from statevalue.server import StatevalueServer
from statevalue.settings import ServerSettings
from statevalue_client import Group, Rollout

_T = TypeVar("_T")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ServerThread:
    """A :class:`StatevalueServer` whose asyncio loop runs on a daemon thread.

    Args:
        backend: the already loaded model (the session fixture), shared by every server.
        settings: overrides of :class:`ServerSettings`; ports default to 0 (any free port),
            warm-up to off (the shared backend is warm already) and the queue-wait bound to
            10 minutes (a busy test machine's throughput says little; the admission tests
            set their own).
    """

    def __init__(self, backend: ModelBackend | None, **settings: Any) -> None:
        settings = {
            "grpc_port": 0,
            "http_port": 0,
            "warmup": False,
            "max_queue_wait_s": 600.0,
            **settings,
        }
        self.settings = ServerSettings(**settings)
        self._backend = backend
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="statevalue-test-loop", daemon=True
        )
        self._thread.start()
        # The grpc.aio server must be built on the loop that will run it.
        self.server: StatevalueServer = self.run(self._build())
        self._stopping: Future[bool] | None = None

    async def _build(self) -> StatevalueServer:
        return StatevalueServer(self.settings, backend=self._backend)

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float = 120.0) -> _T:
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, *, wait_ready: bool = True) -> ServerThread:
        """Listen on both ports; by default also wait until the model is ready."""
        self.run(self.server.start())
        if wait_ready:
            self.run(self.server.wait_ready())
        return self

    def wait_ready(self) -> None:
        self.run(self.server.wait_ready())

    def begin_stop(self, grace: float | None = None) -> Future[bool]:
        """Start the graceful stop on the server's loop and return at once."""
        if self._stopping is None:
            self._stopping = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
        return self._stopping

    def stop(self, grace: float | None = None) -> bool:
        """Drain and close both front ends, then end the loop; True if all work drained."""
        try:
            return self.begin_stop(grace).result(120)
        finally:
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
            if not self._thread.is_alive() and not self._loop.is_closed():
                self._loop.close()

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.server.http_port}"

    def metrics(self) -> str:
        """The /metrics page."""
        response = httpx.get(f"{self.http_url}/metrics", timeout=10)
        response.raise_for_status()
        return response.text

    def health(self, service: str = "") -> int:
        """The grpc.health.v1 status of ``service`` ("" = the whole server)."""
        with grpc.insecure_channel(self.grpc_target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=service)
            return stub.Check(request, timeout=10).status


@contextmanager
def running_server(backend: ModelBackend | None, **settings: Any) -> Iterator[ServerThread]:
    """A started, ready server that is stopped on exit."""
    server = ServerThread(backend, **settings)
    try:
        server.start()
        yield server
    finally:
        server.stop(grace=5.0)


@contextmanager
def hold_model(backend: TorchBackend) -> Iterator[None]:
    """Keep the model busy: every forward pass waits until the block ends.

    TorchBackend runs one forward pass at a time under its own lock; holding that lock
    pins accepted work in the queue (or the warm-up in the load) for as long as a test
    needs, and the real forward pass runs as soon as the block exits.
    """
    lock = backend._lock
    assert lock.acquire(timeout=120), "the model stayed busy"
    try:
        yield
    finally:
        lock.release()


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.02)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{label string: value}`` of every sample of metric ``name`` in a Prometheus page."""
    samples: dict[str, float] = {}
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            samples[match.group(1) or ""] = float(match.group(2))
    return samples


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample's value (0.0 when absent): ``labels`` as printed, e.g. ``{le="1.0"}``."""
    return metric_samples(text, name).get(labels, 0.0)


def free_port() -> int:
    """A loopback port that was free a moment ago (for subprocesses that need a number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client_group(group: GroupInput) -> Group:
    """The client-side :class:`Group` of an engine-side id group."""
    assert group.prompt_ids is not None
    return Group(
        prompt_ids=np.asarray(group.prompt_ids, dtype=np.int32),
        rollouts=[
            Rollout(response_ids=np.asarray(r.response_ids, dtype=np.int32), reward=r.reward)
            for r in group.rollouts
        ],
        group_id=group.group_id,
        prompt_id=group.prompt_id or "",
    )


def json_group(group: GroupInput) -> dict[str, Any]:
    """The HTTP API's JSON object of an engine-side id group."""
    assert group.prompt_ids is not None
    out: dict[str, Any] = {
        "group_id": group.group_id,
        "prompt_ids": np.asarray(group.prompt_ids).tolist(),
        "rollouts": [
            {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
            for r in group.rollouts
        ],
    }
    if group.prompt_id is not None:
        out["prompt_id"] = group.prompt_id
    return out


class RedisServer:
    """Debian's ``redis-server`` on a free loopback port, its data in ``directory``.

    Append-only persistence is on, so a restart (``kill()`` then ``start()``) keeps the data,
    as a production Redis configured for durability does.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make install-dev installs it)")
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, timeout=30, what="redis-server to answer")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the append-only file already holds."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


Serve = tuple[subprocess.Popen[str], int, int, Path]
"""A ``statevalue serve`` subprocess: the process, its gRPC and HTTP ports, its log file."""


def start_serve_process(
    log: Path,
    *flags: str,
    env: dict[str, str] | None = None,
    ports: tuple[int, int] | None = None,
) -> Serve:
    """``statevalue serve`` on loopback (free ports unless ``ports`` = (grpc, http))."""
    grpc_port, http_port = ports or (free_port(), free_port())
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "statevalue.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--device",
                "cpu",
                *flags,
            ],  # fmt: skip
            stdout=output,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    return process, grpc_port, http_port, log


def serve_ready(process: subprocess.Popen[str], http_port: int) -> bool:
    """Whether the subprocess answers /readyz with 200 (raises if it has exited)."""
    if process.poll() is not None:
        raise AssertionError(f"serve exited early with {process.returncode}")
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
