"""Admission limits: a full queue says RESOURCE_EXHAUSTED / 429 + Retry-After, stays healthy.

Only requests that need the model (hista) wait in the queue; holding the model busy pins
the admitted one there, so every limit is hit deterministically.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import AsyncValueClient, Group, Rollout, ValueClient
from statevalue_client import EstimateResult as ClientResult
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.servers import (
    SERVING,
    ServerThread,
    hold_model,
    metric_value,
    running_server,
    wait_for,
)

PROMPT = list(range(100, 120))


def group(k: int, length: int = 40) -> Group:
    """A small distinct group: 20 prompt tokens, two responses of ``length`` tokens."""
    return Group(
        prompt_ids=PROMPT,
        rollouts=[
            Rollout(list(range(200 + k, 200 + k + length)), 1.0),
            Rollout(list(range(300 + k, 300 + k + length)), 0.0),
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


@pytest.fixture(scope="module")
def one_slot(backend: TorchBackend) -> Iterator[ServerThread]:
    """A server whose queue holds a single request."""
    with running_server(backend, max_queue_requests=1, max_wait_ms=100) as running:
        yield running


@pytest.fixture(scope="module")
def few_tokens(backend: TorchBackend) -> Iterator[ServerThread]:
    """A server whose queue, and so each request, holds at most 200 tokens."""
    with running_server(backend, max_queue_tokens=200, max_request_tokens=200) as running:
        yield running


def assert_healthy(server: ServerThread) -> None:
    assert httpx.get(f"{server.http_url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{server.http_url}/readyz", timeout=10).status_code == 200
    assert server.health() == SERVING


def test_full_queue_refuses_with_retry_hint_and_stays_healthy(
    one_slot: ServerThread, backend: TorchBackend
) -> None:
    server = one_slot
    with ValueClient(server.grpc_target, retries=0) as client, ThreadPoolExecutor(8) as pool:
        with hold_model(backend):
            first = pool.submit(client.estimate, [group(0)], ["hista"])
            wait_for(
                lambda: metric_value(server.metrics(), "statevalue_queue_depth") == 1,
                what="the first request to be queued",
            )
            refused = [pool.submit(client.estimate, [group(k)], ["hista"]) for k in (1, 2, 3)]
            for future in refused:
                with pytest.raises(grpc.RpcError) as caught:
                    future.result(timeout=60)
                assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "queue is full" in caught.value.details()
            response = httpx.post(
                f"{server.http_url}/v1/estimate",
                json={"methods": ["hista"], "groups": [as_json(group(4))]},
                timeout=60,
            )
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert "queue is full" in response.json()["detail"]["message"]
            # Methods that need no model bypass the queue, and health stays green.
            numca = client.estimate([group(5)], ["numca", "group_mean"])
            assert [len(r.values["numca"]) for r in numca.groups[0].rollouts] == [40, 40]
            assert_healthy(server)
            assert not first.done()
        # The admitted request completes once the model is free, and so does the next one.
        answer = first.result(timeout=120)
        assert answer.groups[0].group_id == "g0"
        assert [len(r.values["hista"]) for r in answer.groups[0].rollouts] == [40, 40]
        again = client.estimate([group(6)], ["hista"])
        assert again.groups[0].group_id == "g6"
    page = server.metrics()
    status = '{frontend="grpc",rpc="Estimate",status="RESOURCE_EXHAUSTED"}'
    assert metric_value(page, "statevalue_requests_total", status) >= 3
    assert (
        metric_value(
            page, "statevalue_requests_total", '{frontend="http",rpc="estimate",status="429"}'
        )
        >= 1
    )
    assert metric_value(page, "statevalue_queue_depth") == 0


def test_concurrent_load_gets_some_answers_and_some_refusals(one_slot: ServerThread) -> None:
    async def load() -> tuple[list[ClientResult | BaseException], list[httpx.Response]]:
        async with (
            AsyncValueClient(one_slot.grpc_target, retries=0) as client,
            httpx.AsyncClient(base_url=one_slot.http_url, timeout=120) as http,
        ):
            calls = [client.estimate([group(k)], ["hista"]) for k in range(8)]
            posts = [
                http.post(
                    "/v1/estimate", json={"methods": ["hista"], "groups": [as_json(group(k))]}
                )
                for k in range(8, 12)
            ]
            grpc_results = await asyncio.gather(*calls, return_exceptions=True)
            http_results = await asyncio.gather(*posts)
        return grpc_results, http_results

    grpc_results, http_results = asyncio.run(load())
    answered = [r for r in grpc_results if isinstance(r, ClientResult)]
    refused = [
        r
        for r in grpc_results
        if isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ]
    assert len(answered) + len(refused) == len(grpc_results), grpc_results
    assert answered and refused
    for result in answered:
        assert [len(r.values["hista"]) for r in result.groups[0].rollouts] == [40, 40]
    codes = [r.status_code for r in http_results]
    assert set(codes) <= {200, 429}, [r.text for r in http_results]
    assert all(r.headers.get("retry-after") for r in http_results if r.status_code == 429)
    assert_healthy(one_slot)
    with ValueClient(one_slot.grpc_target, retries=0) as client:
        assert client.estimate([group(20)], ["hista"]).groups[0].group_id == "g20"


def test_token_limit(few_tokens: ServerThread, backend: TorchBackend) -> None:
    server = few_tokens
    with ValueClient(server.grpc_target, retries=0) as client, ThreadPoolExecutor(2) as pool:
        # 2 x (20 + 60) = 160 tokens: fits alone; a second one would make 320.
        with hold_model(backend):
            first = pool.submit(client.estimate, [group(0, length=60)], ["hista"])
            wait_for(
                lambda: metric_value(server.metrics(), "statevalue_queue_tokens") == 160,
                what="the first request to be queued",
            )
            with pytest.raises(grpc.RpcError) as caught:
                client.estimate([group(1, length=60)], ["hista"])
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "160 tokens waiting" in caught.value.details()
            assert_healthy(server)
        assert first.result(timeout=120).groups[0].group_id == "g0"
        # A request that could never fit is a permanent error, not "retry later": the client
        # does not send a group over the advertised limit, and the server refuses one.
        with pytest.raises(ValueError, match=r"limit of 200 .*g2 \(240 tokens\)"):
            client.estimate([group(2, length=100)], ["hista"])
        with grpc.insecure_channel(server.grpc_target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.ValueServiceStub(channel).Estimate(
                    build_request([group(2, length=100)], ["hista"], {}), timeout=60
                )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("groups: the request has 240 ")
        response = httpx.post(
            f"{server.http_url}/v1/estimate",
            json={"methods": ["hista"], "groups": [as_json(group(3, length=100))]},
            timeout=60,
        )
        assert response.status_code == 400, response.text
        assert response.json()["detail"]["field"] == "groups"
    # Two groups that fit one by one go as two requests, one after the other.
    with ValueClient(server.grpc_target, retries=0, max_in_flight=1) as client:
        both = client.estimate([group(4, length=60), group(5, length=60)], ["hista"])
        assert [g.group_id for g in both.groups] == ["g4", "g5"]
