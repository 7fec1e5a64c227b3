"""Deadlines and cancellation take effect inside a request, between forward micro-batches.

The model is held busy (its lock) while a request's first micro-batch waits for it, so the
deadline or the cancel lands at a known point. The request leaves the queue at once (its
tokens stop counting for admission while the model is still busy); then the tokens that
reached the model show that the rest of its work was dropped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.servers import ServerThread, hold_model, metric_value, running_server, wait_for

BATCH_TOKENS = 256
PROMPT, RESPONSE, ROLLOUTS = 10, 200, 8  # one 210-token sequence per micro-batch: 8 of them


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend, max_batch_tokens=BATCH_TOKENS, max_wait_ms=0) as running:
        yield running


def long_group(seed: int = 0) -> Group:
    rng = np.random.default_rng(seed)
    return Group(
        prompt_ids=rng.integers(100, 40000, PROMPT),
        rollouts=[
            Rollout(rng.integers(100, 40000, RESPONSE), float(i % 2)) for i in range(ROLLOUTS)
        ],
    )


def http_body(group: Group) -> dict[str, object]:
    return {
        "methods": ["hista"],
        "groups": [
            {
                "prompt_ids": np.asarray(group.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in group.rollouts
                ],
            }
        ],
    }


def steps_started(server: ServerThread) -> float:
    return metric_value(server.metrics(), "statevalue_queue_wait_seconds_count")


def tokens(server: ServerThread) -> float:
    return metric_value(server.metrics(), "statevalue_tokens_total")


def left_the_queue(server: ServerThread) -> None:
    """Nothing of the given-up request is queued, though its micro-batch still holds the model."""
    page = server.metrics()
    assert metric_value(page, "statevalue_queue_depth") == 0
    assert metric_value(page, "statevalue_queue_tokens") == 0


def first_micro_batch_only(server: ServerThread, before: float) -> None:
    """After the model is free again, only the held micro-batch has reached it (the queue
    was empty when it ended, so no later micro-batch can take more of the request)."""
    wait_for(lambda: tokens(server) > before, 60, "the held micro-batch to end")
    assert tokens(server) - before == PROMPT + RESPONSE


def test_grpc_deadline_inside_the_forward_pass(server: ServerThread, backend: TorchBackend) -> None:
    before, started = tokens(server), steps_started(server)
    request = build_request([long_group()], ["hista"], {})
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ValueServiceStub(channel)
        with hold_model(backend):
            call = stub.Estimate.future(request, timeout=2.0)
            wait_for(lambda: steps_started(server) > started, 30, "the first micro-batch")
            with pytest.raises(grpc.RpcError) as caught:
                call.result(timeout=30)
            left_the_queue(server)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "during the forward pass, at micro-batch 1 of about 8" in caught.value.details()
    first_micro_batch_only(server, before)


def test_http_deadline_says_queued_or_forward(server: ServerThread, backend: TorchBackend) -> None:
    url = f"{server.http_url}/v1/estimate"
    before, started = tokens(server), steps_started(server)
    answers: dict[str, httpx.Response] = {}

    def post(name: str, group: Group, timeout: str) -> None:
        headers = {"x-request-timeout": timeout}
        answers[name] = httpx.post(url, json=http_body(group), headers=headers, timeout=60)

    with hold_model(backend):
        first = threading.Thread(target=post, args=("forward", long_group(1), "2"))
        first.start()
        wait_for(lambda: steps_started(server) > started, 30, "the first micro-batch")
        # The model is busy with the first request's micro-batch: the second one waits.
        second = threading.Thread(target=post, args=("queued", long_group(2), "1"))
        second.start()
        first.join(30)
        second.join(30)
        left_the_queue(server)
    for name in ("forward", "queued"):
        assert answers[name].status_code == 504, answers[name].text
    assert "micro-batch 1 of about 8" in answers["forward"].json()["detail"]["message"]
    assert "while queued" in answers["queued"].json()["detail"]["message"]
    first_micro_batch_only(server, before)


def test_grpc_cancel_drops_the_rest(server: ServerThread, backend: TorchBackend) -> None:
    before, started = tokens(server), steps_started(server)
    status = '{frontend="grpc",rpc="Estimate",status="CANCELLED"}'
    cancelled = metric_value(server.metrics(), "statevalue_requests_total", status)
    request = build_request([long_group(3)], ["hista"], {})
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ValueServiceStub(channel)
        with hold_model(backend):
            call = stub.Estimate.future(request, timeout=60)
            wait_for(lambda: steps_started(server) > started, 30, "the first micro-batch")
            call.cancel()
            wait_for(
                lambda: (
                    metric_value(server.metrics(), "statevalue_requests_total", status) > cancelled
                ),
                30,
                "the server to see the cancel",
            )
            left_the_queue(server)
    first_micro_batch_only(server, before)


def test_http_disconnect_drops_the_rest(server: ServerThread, backend: TorchBackend) -> None:
    before, started = tokens(server), steps_started(server)
    status = '{frontend="http",rpc="estimate",status="499"}'
    gone = metric_value(server.metrics(), "statevalue_requests_total", status)
    with hold_model(backend):
        client = threading.Thread(
            target=lambda: pytest.raises(
                httpx.ReadTimeout,
                httpx.post,
                f"{server.http_url}/v1/estimate",
                json=http_body(long_group(4)),
                timeout=httpx.Timeout(60, read=1.0),
            )
        )
        client.start()
        wait_for(lambda: steps_started(server) > started, 30, "the first micro-batch")
        client.join(30)  # the client gave up and closed its connection
        wait_for(
            lambda: metric_value(server.metrics(), "statevalue_requests_total", status) > gone,
            30,
            "the server to see the disconnect",
        )
        left_the_queue(server)
    first_micro_batch_only(server, before)
