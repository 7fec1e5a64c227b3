"""Drain and admission under more work than the server can do in time.

A drain that runs out of grace answers every open request 503 / UNAVAILABLE ("draining")
instead of leaving it hanging; admission refuses at once a request that would wait longer
than ``max_queue_wait_s`` at the measured throughput. Holding the model busy pins accepted
work in the queue, so both limits are hit deterministically.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import ServerThread, hold_model, metric_value, running_server, wait_for

PROMPT = list(range(100, 120))


def group(k: int, rollouts: int = 2, length: int = 40) -> Group:
    return Group(
        prompt_ids=PROMPT,
        rollouts=[
            Rollout(list(range(200 + k + j, 200 + k + j + length)), float(j % 2))
            for j in range(rollouts)
        ],
        group_id=f"g{k}",
    )


def as_json(g: Group) -> dict[str, object]:
    return {
        "group_id": g.group_id,
        "prompt_ids": list(g.prompt_ids),
        "rollouts": [
            {"response_ids": list(r.response_ids), "reward": r.reward} for r in g.rollouts
        ],
    }


def test_drain_past_the_grace_answers_every_open_request(backend: TorchBackend) -> None:
    server = ServerThread(backend, max_wait_ms=50).start()
    grace = 3.0
    try:
        with (
            ValueClient(server.grpc_target, retries=0, timeout=60) as client,
            ThreadPoolExecutor(8) as pool,
            hold_model(backend),
        ):
            calls = [pool.submit(client.estimate, [group(k)], ["hista"]) for k in range(3)]
            posts = [
                pool.submit(
                    httpx.post,
                    f"{server.http_url}/v1/estimate",
                    json={"methods": ["hista"], "groups": [as_json(group(k))]},
                    timeout=60,
                )
                for k in range(3, 5)
            ]
            wait_for(
                lambda: metric_value(server.metrics(), "statevalue_queue_depth") == 5,
                what="five requests to be queued",
            )
            started = time.monotonic()
            stopping = server.begin_stop(grace)
            # New work during the drain is refused at once, and says why.
            wait_for(lambda: not server.server.ready, what="the drain to begin")
            late = httpx.post(
                f"{server.http_url}/v1/estimate",
                json={"methods": ["hista"], "groups": [as_json(group(9))]},
                timeout=10,
            )
            assert late.status_code == 503 and "draining" in late.json()["detail"]["message"]
            ready = httpx.get(f"{server.http_url}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["detail"]["message"] == "draining"
            # The model is still held: the queued work cannot finish, and the stop still
            # ends within the grace, every accepted request answered "draining".
            assert stopping.result(timeout=grace + 5) is False
            elapsed = time.monotonic() - started
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call.result(timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "draining" in caught.value.details()
            for post in posts:
                response = post.result(timeout=10)
                assert response.status_code == 503, response.text
                assert "draining" in response.json()["detail"]["message"]
        assert elapsed < grace + 1.0, elapsed
        page = server.server.metrics.render().decode()
        unavailable = '{frontend="grpc",rpc="Estimate",status="UNAVAILABLE"}'
        assert metric_value(page, "statevalue_requests_total", unavailable) == 3
        drained_http = '{frontend="http",rpc="estimate",status="503"}'
        assert metric_value(page, "statevalue_requests_total", drained_http) == 3
    finally:
        server.stop(grace=1.0)


def test_a_drain_refuses_at_once_what_could_not_start_in_time(
    backend: TorchBackend, caplog: pytest.LogCaptureFixture
) -> None:
    server = ServerThread(backend, warmup=True, max_wait_ms=0).start()
    grace = 4.0
    try:
        rate = server.server.scheduler.tokens_per_second
        # Each request about a grace of model work at the speed the warm-up measured.
        rollouts = max(1, round(grace * rate / 220))
        with (
            ValueClient(server.grpc_target, retries=0, timeout=120) as client,
            ThreadPoolExecutor(6) as pool,
            hold_model(backend),
        ):
            calls = [
                pool.submit(client.estimate, [group(k, rollouts, 200)], ["hista"]) for k in range(6)
            ]
            wait_for(
                lambda: metric_value(server.metrics(), "statevalue_queue_depth") == 6,
                what="six requests to be queued",
            )
            with caplog.at_level(logging.INFO, logger="statevalue.scheduler"):
                assert server.begin_stop(grace).result(timeout=120) is False
            for call in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call.result(timeout=60)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The model was held all along: the first request's first micro-batch never ended,
        # and the last ones, estimated to wait several graces, did not wait for this one.
        early = [r.getMessage() for r in caplog.records if "refused at once" in r.getMessage()]
        assert early, caplog.text
    finally:
        server.stop(grace=1.0)


@pytest.fixture(scope="module")
def short_wait(backend: TorchBackend) -> ServerThread:
    with running_server(backend, max_queue_wait_s=0.05, max_wait_ms=20) as running:
        yield running


def test_admission_refuses_a_wait_past_the_limit_at_once(
    short_wait: ServerThread, backend: TorchBackend
) -> None:
    server = short_wait
    with ValueClient(server.grpc_target, retries=0, timeout=120) as client:
        # One real request measures the model's throughput.
        client.estimate([group(0)], ["hista"])
        rate = metric_value(server.metrics(), "statevalue_throughput_tokens_per_second")
        assert rate > 0
        # A queued request worth about two limits of model time makes the next one wait
        # too long; it is refused without waiting.
        rollouts = math.ceil(2 * server.settings.max_queue_wait_s * rate / 300) + 1
        big = group(1, rollouts=rollouts, length=280)
        with ThreadPoolExecutor(1) as pool, hold_model(backend):
            first = pool.submit(client.estimate, [big], ["hista"])
            wait_for(
                lambda: metric_value(server.metrics(), "statevalue_queue_depth") == 1,
                what="the big request to be queued",
            )
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                client.estimate([group(2)], ["hista"])
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "estimated wait" in caught.value.details()
            # The time until it would fit: the estimated wait past the limit.
            hint = dict(caught.value.trailing_metadata())["retry-after"]
            assert float(hint) >= 1.0
            response = httpx.post(
                f"{server.http_url}/v1/estimate",
                json={"methods": ["hista"], "groups": [as_json(group(3))]},
                timeout=30,
            )
            assert time.monotonic() - started < 5.0
            assert response.status_code == 429, response.text
            assert "estimated wait" in response.json()["detail"]["message"]
            assert int(response.headers["retry-after"]) >= 1
            # Work that never queues for the model is not refused.
            numca = client.estimate([group(4)], ["numca"])
            assert len(numca.groups[0].rollouts) == 2
        # The admitted request completes once the model is free.
        answer = first.result(timeout=300)
        assert len(answer.groups[0].rollouts) == rollouts
    assert client_after_queue_empties(server)


def client_after_queue_empties(server: ServerThread) -> bool:
    with ValueClient(server.grpc_target, retries=0, timeout=120) as client:
        return client.estimate([group(5)], ["hista"]).groups[0].group_id == "g5"
