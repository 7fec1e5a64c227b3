"""Health over the life cycle: loading -> ready -> draining, on gRPC health and HTTP probes.

The model is held busy (its forward lock taken) to pin the server in the loading and the
draining state for as long as the checks take, so no step depends on timing.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.grpc_server import SERVICE_NAME
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import (
    NOT_SERVING,
    SERVING,
    ServerThread,
    hold_model,
    metric_value,
    wait_for,
)

GROUP = Group(
    prompt_ids=[1, 2, 3],
    rollouts=[Rollout([4, 5, 6], 1.0), Rollout([7, 8], 0.0)],
    group_id="g1",
)
BODY = {
    "methods": ["hista"],
    "groups": [
        {
            "prompt_ids": [1, 2, 3],
            "rollouts": [
                {"response_ids": [4, 5, 6], "reward": 1.0},
                {"response_ids": [7, 8], "reward": 0.0},
            ],
        }
    ],
}


def probes(server: ServerThread) -> tuple[int, int]:
    """HTTP status codes of /healthz and /readyz."""
    live = httpx.get(f"{server.http_url}/healthz", timeout=10).status_code
    ready = httpx.get(f"{server.http_url}/readyz", timeout=10).status_code
    return live, ready


def assert_unavailable(server: ServerThread, client: ValueClient, why: str) -> None:
    """Estimate is refused as UNAVAILABLE on gRPC and 503 on HTTP, saying ``why``."""
    with pytest.raises(grpc.RpcError) as caught:
        client.estimate([GROUP], ["hista"])
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert why in caught.value.details()
    response = httpx.post(f"{server.http_url}/v1/estimate", json=BODY, timeout=30)
    assert response.status_code == 503, response.text
    assert why in response.json()["detail"]["message"]


def test_health_follows_loading_ready_and_draining(backend: TorchBackend) -> None:
    server = ServerThread(backend, warmup=True, shutdown_grace_s=60)
    try:
        # Loading: both front ends listen, the warm-up forward pass waits for the model.
        with hold_model(backend):
            server.start(wait_ready=False)
            with ValueClient(server.grpc_target, retries=0) as client:
                assert server.health() == NOT_SERVING
                assert server.health(SERVICE_NAME) == NOT_SERVING
                assert probes(server) == (200, 503)
                assert_unavailable(server, client, "not ready")
        server.wait_ready()

        # Ready.
        assert server.health() == SERVING
        assert server.health(SERVICE_NAME) == SERVING
        assert probes(server) == (200, 200)
        with ValueClient(server.grpc_target, retries=0) as client, ThreadPoolExecutor(1) as pool:
            assert client.estimate([GROUP], ["hista"]).groups[0].group_id == "g1"

            # Draining: stop begins while a request waits for the model.
            with hold_model(backend):
                in_flight = pool.submit(client.estimate, [GROUP], ["hista"])
                wait_for(
                    lambda: metric_value(server.metrics(), "statevalue_queue_depth") == 1,
                    what="the request to be queued",
                )
                stopping = server.begin_stop()
                wait_for(lambda: server.health() == NOT_SERVING, what="NOT_SERVING")
                assert server.health(SERVICE_NAME) == NOT_SERVING
                assert probes(server) == (200, 503)
                assert_unavailable(server, client, "draining")
                assert not in_flight.done() and not stopping.done()
            # The accepted request still gets its whole answer, then the server stops.
            answer = in_flight.result(timeout=120)
            assert [len(r.values["hista"]) for r in answer.groups[0].rollouts] == [3, 2]
            assert stopping.result(timeout=120) is True
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.http_url}/healthz", timeout=5)


def test_a_retrying_client_outlasts_a_loading_server(backend: TorchBackend) -> None:
    server = ServerThread(backend, warmup=True)
    pool = ThreadPoolExecutor(1)
    try:
        with hold_model(backend):
            server.start(wait_ready=False)
            with ValueClient(server.grpc_target, retries=2, unavailable_wait_s=0) as client:
                with pytest.raises(grpc.RpcError) as caught:
                    client.estimate([GROUP], ["group_mean"])
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            patient = ValueClient(server.grpc_target, retries=2, unavailable_wait_s=120)
            answer = pool.submit(patient.estimate, [GROUP], ["group_mean"])
            time.sleep(3.0)  # past the two counted retries: only the wait keeps it going
            assert not answer.done()
        # The model is released: the warm-up runs, the server turns ready, the call lands.
        assert answer.result(timeout=120).groups[0].group_id == "g1"
        patient.close()
    finally:
        pool.shutdown()
        server.stop()


def test_stop_while_loading_never_turns_ready(backend: TorchBackend) -> None:
    server = ServerThread(backend, warmup=True)
    try:
        with hold_model(backend):
            server.start(wait_ready=False)
            assert probes(server) == (200, 503)
            stopping = server.begin_stop(grace=5)
            assert stopping.result(timeout=60) is True
        # The warm-up may now finish, but the cancelled load never makes the server ready.
        time.sleep(0.5)
        assert server.server.ready is False
        assert server.server.scheduler is None
    finally:
        server.stop()
