"""Load on one statevalue server: an HTTP user and a gRPC user sending the same mix
(bench/load/mix.py: the shape of the figures in docs/reliability.md).

    pip install -e ".[load]"
    statevalue serve --device cpu &
    python -m locust -f bench/load/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051 --csv load

Requests are closed-loop (each user waits for its answer, then sends the next), so the
number of users sets the offered load; ``--think-s`` adds a pause between requests, and
``--rate-per-user R`` paces each user to at most R requests/s (an offered load of users × R
while answers come faster than 1/R). bench/load/scenarios.py runs the documented scenarios.
"""

from __future__ import annotations

import random
import time
from typing import Any

import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import HttpUser, User, between, events, task
from locust.env import Environment

from bench.load.mix import METHODS, as_json, make_group
from statevalue_client import ValueClient

# gRPC's core runs its own threads; this makes its blocking calls yield to locust's
# greenlets, so gRPC users run concurrently as HTTP users do.
grpc_gevent.init_gevent()


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="gRPC host:port")
    parser.add_argument("--think-s", type=float, default=0.0, help="pause between requests")
    parser.add_argument(
        "--rate-per-user", type=float, default=0.0, help="at most this many requests/s per user"
    )


def _start(environment: Environment) -> None:
    """Paced users start at random points of one period, not all at once."""
    options = environment.parsed_options
    if options is not None and options.rate_per_user > 0:
        time.sleep(random.uniform(0, 1.0 / options.rate_per_user))


def _pause(environment: Environment, started: float, refused_for: float = 0.0) -> None:
    """The think time, or what is left of the pacing period since ``started``; after a
    refusal at least ``refused_for`` seconds, as a well-behaved client backs off."""
    options = environment.parsed_options
    if options is None:
        return
    pause = max(float(options.think_s), refused_for)
    if options.rate_per_user > 0:
        pause = max(pause, 1.0 / options.rate_per_user - (time.perf_counter() - started))
    if pause > 0:
        time.sleep(pause)


class EstimateHttpUser(HttpUser):
    """POST /v1/estimate; a 429 or 503 is a refusal (counted as a failure by its code).

    Requests are named by their answer ("http 200", "http 429"): locust's table then has
    each status's count and latency percentiles.
    """

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        _start(self.environment)

    @task
    def estimate(self) -> None:
        body = as_json(make_group(self.rng))
        started = time.perf_counter()
        with self.client.post(
            "/v1/estimate", json=body, name="http estimate", catch_response=True, timeout=300
        ) as response:
            # Named by status, so each status gets its own latency percentiles.
            response.request_meta["name"] = f"http {response.status_code}"
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
            refused = response.status_code in (429, 503)
            retry_after = float(response.headers.get("retry-after", 1)) if refused else 0.0
        _pause(self.environment, started, retry_after)


class EstimateGrpcUser(User):
    """Estimate over gRPC through the Python client (no retries: refusals are counted)."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        target = self.environment.parsed_options.grpc_target
        self.client = ValueClient(target, retries=0, timeout=300)
        _start(self.environment)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def estimate(self) -> None:
        group = make_group(self.rng)
        started = time.perf_counter()
        error: Exception | None = None
        status = "OK"
        try:
            self.client.estimate([group], METHODS)
        except grpc.RpcError as exc:
            status = exc.code().name
            error = Exception(f"gRPC {status}")
        self.environment.events.request.fire(
            request_type="grpc",
            name=f"grpc {status}",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
        refused = status in ("RESOURCE_EXHAUSTED", "UNAVAILABLE")
        _pause(self.environment, started, 1.0 if refused else 0.0)
