"""Every reply is what it claims: no non-finite number in a success, every status counted
with its real code and logged once under the caller's request id, bad bytes refused cleanly.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, InvalidRequest, RolloutInput
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.wire import build_request
from tests.servers import SERVING, ServerThread, metric_value, running_server

MAX_MESSAGE_MB = 1
PROMPT = [1, 2, 3]


def body(**changes: object) -> dict[str, object]:
    out: dict[str, object] = {
        "methods": ["numca", "group_mean"],
        "groups": [
            {
                "group_id": "g",
                "prompt_ids": PROMPT,
                "rollouts": [
                    {"response_ids": [4, 5, 6], "reward": 1.0},
                    {"response_ids": [7, 8], "reward": 0.0},
                ],
            }
        ],
    }
    out.update(changes)
    return out


def rewards_body(*rewards: float, **changes: object) -> dict[str, object]:
    rollouts = [{"response_ids": [4 + j, 5 + j], "reward": r} for j, r in enumerate(rewards)]
    return body(groups=[{"group_id": "g", "prompt_ids": PROMPT, "rollouts": rollouts}], **changes)


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend, max_message_mb=MAX_MESSAGE_MB) as running:
        yield running


def http_count(server: ServerThread, status: int) -> float:
    labels = f'{{frontend="http",rpc="estimate",status="{status}"}}'
    return metric_value(server.metrics(), "statevalue_requests_total", labels)


# -- non-finite answers --------------------------------------------------------------------


def engine_request(rewards: list[float], **advantage: object) -> EstimateRequest:
    return EstimateRequest(
        groups=[
            GroupInput(
                prompt_ids=np.asarray(PROMPT),
                rollouts=[
                    RolloutInput(response_ids=np.asarray([4 + j, 5 + j]), reward=r)
                    for j, r in enumerate(rewards)
                ],
            )
        ],
        methods=("numca", "group_mean"),
        config=EstimatorConfig.model_validate({"advantage": advantage}),
    )


@pytest.mark.parametrize("reward", [1e200, -1e308, 1e16])
def test_engine_refuses_rewards_that_would_overflow(engine: Engine, reward: float) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.estimate(engine_request([reward, 0.0]))
    assert caught.value.field == "groups[0].rollouts[0].reward"


def test_engine_refuses_a_zero_std_division(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as caught:
        engine.estimate(engine_request([1.0, 1.0], scale_eps=0.0))
    assert caught.value.field == "params.advantage.scale_eps"
    # The same rewards with the default eps, or with unequal rewards and eps 0, are fine.
    for request in (engine_request([1.0, 1.0]), engine_request([1.0, 0.0], scale_eps=0.0)):
        result = engine.estimate(request)
        for rollout in result.groups[0].rollouts:
            for method in ("numca", "group_mean"):
                assert np.isfinite(rollout.values[method]).all()
                assert np.isfinite(rollout.advantages[method]).all()


def test_large_but_bounded_rewards_answer_finite_numbers(engine: Engine) -> None:
    result = engine.estimate(engine_request([1e15, -1e15]))
    for rollout in result.groups[0].rollouts:
        for method in ("numca", "group_mean"):
            assert np.isfinite(np.asarray(rollout.advantages[method], dtype=np.float32)).all()


def test_front_ends_name_the_field_of_an_overflowing_input(server: ServerThread) -> None:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=rewards_body(1e308, 0.0))
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["field"] == "groups[0].rollouts[0].reward"
    response = httpx.post(
        f"{server.http_url}/v1/estimate",
        json=rewards_body(0.5, 0.5, params={"advantage": {"scale_eps": 0.0}}),
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["field"] == "params.advantage.scale_eps"
    group = Group(PROMPT, [Rollout([4, 5], 1e200), Rollout([6], 0.0)])
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([group], ["group_mean"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("groups[0].rollouts[0].reward: ")


# -- statuses, counts and request ids --------------------------------------------------------


def test_every_http_status_is_counted_logged_and_carries_the_request_id(
    server: ServerThread, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{server.http_url}/v1/estimate"
    before = {status: http_count(server, status) for status in (200, 413, 422, 500)}
    caplog.set_level(logging.INFO, logger="statevalue")

    ok = httpx.post(url, json=body(), headers={"x-request-id": "trainer-7.step-3"})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "trainer-7.step-3"
    # A request id that is not short and plain is replaced, never echoed into the log.
    odd = httpx.post(url, json=body(), headers={"x-request-id": "a b " + "x" * 200})
    assert odd.status_code == 200 and re.fullmatch(r"[0-9a-f]{16}", odd.headers["x-request-id"])
    # Schema errors (422): token ids given as strings are not token ids.
    strings = body()
    strings["groups"][0]["prompt_ids"] = ["1", "2"]  # type: ignore[index]
    invalid = httpx.post(url, json=strings, headers={"x-request-id": "r-422"})
    assert invalid.status_code == 422 and invalid.headers["x-request-id"] == "r-422"
    # Body over the limit (413), answered before the route.
    huge = json.dumps(body()).encode() + b" " * (MAX_MESSAGE_MB << 20)
    too_large = httpx.post(url, content=huge, headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and too_large.headers["x-request-id"]
    # A crash below the front end (500) is answered with the request id, not a hang.
    scheduler = server.server.scheduler
    assert scheduler is not None

    def crash(*args: object) -> None:
        raise RuntimeError("estimator bug")

    monkeypatch.setattr(scheduler.engine, "compute", crash)
    failed = httpx.post(url, json=body(), headers={"x-request-id": "r-500"})
    monkeypatch.undo()
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "r-500"
    assert "r-500" in failed.json()["detail"]["message"]

    for status, new in ((200, 2), (413, 1), (422, 1), (500, 1)):
        assert http_count(server, status) == before[status] + new, status
    lines = [r.getMessage() for r in caplog.records if "frontend=http" in r.getMessage()]
    for rid, status in (("trainer-7.step-3", 200), ("r-422", 422), ("r-500", 500)):
        mine = [line for line in lines if f"request_id={rid} " in line]
        assert len(mine) == 1 and f"status={status}" in mine[0], lines


def test_grpc_echoes_the_request_id_on_success_and_error(server: ServerThread) -> None:
    group = Group(PROMPT, [Rollout([4, 5], 1.0), Rollout([6], 0.0)])
    with grpc.insecure_channel(server.grpc_target) as channel:
        estimate = channel.unary_unary(
            "/statevalue.v1.ValueService/Estimate",
            request_serializer=lambda m: m.SerializeToString(),
        )
        request = build_request([group], ["group_mean"], {})
        _, call = estimate.with_call(request, metadata=(("x-request-id", "step-9"),), timeout=30)
        assert ("x-request-id", "step-9") in call.trailing_metadata()
        bad = build_request([group], ["nope"], {})
        with pytest.raises(grpc.RpcError) as caught:
            estimate(bad, metadata=(("x-request-id", "step-10"),), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("x-request-id", "step-10") in caught.value.trailing_metadata()


def test_undecodable_grpc_message_is_invalid_argument_without_a_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    labels = '{frontend="grpc",rpc="Estimate",status="INVALID_ARGUMENT"}'
    before = metric_value(server.metrics(), "statevalue_requests_total", labels)
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.grpc_target) as channel:
        raw = channel.unary_unary("/statevalue.v1.ValueService/Estimate")
        for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\x01", b"\x12"):
            with pytest.raises(grpc.RpcError) as caught:
                raw(garbage, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid statevalue.v1.EstimateRequest" in caught.value.details()
    assert metric_value(server.metrics(), "statevalue_requests_total", labels) == before + 3
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_unknown_method_is_unimplemented_without_echoing_a_huge_name(
    server: ServerThread,
) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        for method in ("/statevalue.v1.ValueService/Nope", "/x." + "y" * 2_000 + "/Z"):
            with pytest.raises(grpc.RpcError) as caught:
                channel.unary_unary(method)(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert len(caught.value.details()) < 200
        # The real services still answer.
        assert server.health() == SERVING


def test_client_refuses_token_ids_that_do_not_fit_int32() -> None:
    with pytest.raises(ValueError, match="2147483648"):
        build_request([Group([1, 2**31], [Rollout([3], 1.0)])], ["numca"], {})
    with pytest.raises(ValueError, match="does not fit in int32"):
        build_request([Group([1], [Rollout([3, -(2**31) - 1], 1.0)])], ["numca"], {})
