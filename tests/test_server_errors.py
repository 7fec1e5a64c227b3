"""Malformed requests get clear errors naming the field, on both front ends."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.servers import SERVING, ServerThread, metric_value, running_server

MAX_MESSAGE_MB = 1


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    """A ready server whose gRPC messages and HTTP bodies are limited to 1 MiB.

    Its per-request token limit is above what 1 MiB holds, so the message size is what a
    huge request meets first.
    """
    with running_server(
        backend, max_message_mb=MAX_MESSAGE_MB, max_request_tokens=1_000_000
    ) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.ValueServiceStub]:
    """The raw generated stub, so tests can send what the client would never build."""
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.ValueServiceStub(channel)


def _group(
    prompt: list[int] | None = None, rollouts: list[Rollout] | None = None, group_id: str = ""
) -> Group:
    return Group(
        prompt_ids=[1, 2, 3] if prompt is None else prompt,
        rollouts=[Rollout([4, 5, 6], 1.0), Rollout([7, 8], 0.0)] if rollouts is None else rollouts,
        group_id=group_id,
    )


def _request(
    groups: list[Group] | None = None,
    methods: tuple[str, ...] = ("numca", "hista", "group_mean"),
    **params: dict[str, Any],
) -> pb.EstimateRequest:
    return build_request([_group()] if groups is None else groups, methods, params)


def _edit(change: Callable[[pb.EstimateRequest], None]) -> pb.EstimateRequest:
    request = _request()
    change(request)
    return request


def _set_num_tokens(request: pb.EstimateRequest) -> None:
    request.groups[0].rollouts[0].num_tokens = 5


def _cut_response_bytes(request: pb.EstimateRequest) -> None:
    request.groups[0].rollouts[1].response_ids = request.groups[0].rollouts[1].response_ids[:-1]


def _set_prompt_count(request: pb.EstimateRequest) -> None:
    request.groups[0].prompt_num_tokens = 2


def _short_token_rewards(request: pb.EstimateRequest) -> None:
    request.groups[0].rollouts[0].token_rewards = np.zeros(2, dtype="<f4").tobytes()


GRPC_CASES: list[tuple[str, pb.EstimateRequest, str, str]] = [
    (
        "count mismatch",
        _edit(_set_num_tokens),
        "groups[0].rollouts[0].response_ids",
        "has 3 values but its count says 5",
    ),
    (
        "bytes not int32",
        _edit(_cut_response_bytes),
        "groups[0].rollouts[1].response_ids",
        "7 bytes is not a whole number of 4-byte int32 values",
    ),
    (
        "prompt count mismatch",
        _edit(_set_prompt_count),
        "groups[0].prompt_ids",
        "count says 2",
    ),
    (
        "token rewards length",
        _edit(_short_token_rewards),
        "groups[0].rollouts[0].token_rewards",
        "count says 3",
    ),
    (
        "nan reward",
        _request([_group(rollouts=[Rollout([4, 5], math.nan)])]),
        "groups[0].rollouts[0].reward",
        "must be finite",
    ),
    (
        "no reward at all",
        _request([_group(rollouts=[Rollout([4, 5])])]),
        "groups[0].rollouts",
        "at least one rollout with a reward",
    ),
    (
        "unknown method",
        _request(methods=("numca", "ppo")),
        "methods",
        "unknown method 'ppo'",
    ),
    (
        "bad parameter value",
        _request(hista={"d_min": -1.0}),
        "params.hista.d_min",
        "greater than 0",
    ),
    (
        "bad parameter choice",
        _request(advantage={"scale": "sometimes"}),
        "params.advantage.scale",
        "'group', 'batch' or 'none'",
    ),
    (
        "inconsistent parameters",
        _request(hista={"k_min": 10, "k_max": 5}),
        "params.hista",
        "k_min must not exceed k_max",
    ),
    (
        "token id outside the vocabulary",
        _request([_group(), _group(rollouts=[Rollout([4, 1_000_000], 1.0)])]),
        "groups[1].rollouts[0].response_ids",
        "token id 1000000 is outside the vocabulary",
    ),
    (
        "negative prompt id",
        _request([_group(prompt=[-1, 2])]),
        "groups[0].prompt_ids",
        "token id -1 is outside the vocabulary",
    ),
    ("no groups", _request([]), "groups", "no groups"),
]


@pytest.mark.parametrize(
    ("request_", "field", "words"),
    [case[1:] for case in GRPC_CASES],
    ids=[case[0] for case in GRPC_CASES],
)
def test_grpc_invalid_argument_names_the_field(
    stub: pb_grpc.ValueServiceStub, request_: pb.EstimateRequest, field: str, words: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Estimate(request_, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert details.startswith(f"{field}: "), details
    assert words in details


def test_grpc_oversize_message_is_refused_and_server_stays_up(
    server: ServerThread,
) -> None:
    # 300k int32 ids are ~1.2 MB: over the server's 1 MiB but under the client's default.
    huge = _group(rollouts=[Rollout(np.ones(300_000, dtype=np.int32), 1.0)])
    with ValueClient(server.grpc_target, retries=0) as client:
        assert client.retries == 0
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([huge], ["group_mean"])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in caught.value.details()
        result = client.estimate([_group()], ["group_mean"])
    assert [len(r.values["group_mean"]) for r in result.groups[0].rollouts] == [3, 2]
    assert server.health() == SERVING


def test_grpc_invalid_requests_are_counted(server: ServerThread) -> None:
    before = metric_value(
        server.metrics(),
        "statevalue_requests_total",
        '{frontend="grpc",rpc="Estimate",status="INVALID_ARGUMENT"}',
    )
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([_group()], ["ppo"])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = metric_value(
        server.metrics(),
        "statevalue_requests_total",
        '{frontend="grpc",rpc="Estimate",status="INVALID_ARGUMENT"}',
    )
    assert after == before + 1


BODY: dict[str, Any] = {
    "methods": ["numca", "hista", "group_mean"],
    "groups": [
        {
            "group_id": "g1",
            "prompt_ids": [1, 2, 3],
            "rollouts": [
                {"response_ids": [4, 5, 6], "reward": 1.0},
                {"response_ids": [7, 8], "reward": 0.0},
            ],
        }
    ],
}


def _body(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """BODY with the item at ``path`` set to ``value``."""
    body = copy.deepcopy(BODY)
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


HTTP_400_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "token id outside the vocabulary",
        _body(("groups", 0, "rollouts", 1, "response_ids"), [7, 49152]),
        "groups[0].rollouts[1].response_ids",
        "outside the vocabulary",
    ),
    ("unknown method", _body(("methods",), ["hista", "ppo"]), "methods", "unknown method"),
    (
        "no reward at all",
        _body(("groups", 0, "rollouts"), [{"response_ids": [4]}]),
        "groups[0].rollouts",
        "at least one rollout with a reward",
    ),
    (
        "ids and text",
        _body(("groups", 0, "prompt_text"), "Tom has 5 apples."),
        "groups[0].prompt_ids",
        "exactly one of",
    ),
    ("no groups", _body(("groups",), []), "groups", "no groups"),
]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [case[1:] for case in HTTP_400_CASES],
    ids=[case[0] for case in HTTP_400_CASES],
)
def test_http_400_names_the_field(
    server: ServerThread, body: dict[str, Any], field: str, words: str
) -> None:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=60)
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail["field"] == field
    assert words in detail["message"]


def test_http_nan_reward_is_400(server: ServerThread) -> None:
    # Strict JSON has no NaN; Python's json writes the NaN literal, which pydantic reads.
    content = json.dumps(_body(("groups", 0, "rollouts", 0, "reward"), math.nan))
    assert "NaN" in content
    response = httpx.post(
        f"{server.http_url}/v1/estimate",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["field"] == "groups[0].rollouts[0].reward"


HTTP_422_CASES: list[tuple[str, dict[str, Any], list[Any]]] = [
    (
        "unknown group field",
        _body(("groups", 0, "prompt_idz"), [1]),
        ["body", "groups", 0, "prompt_idz"],
    ),
    ("unknown top-level field", _body(("group",), []), ["body", "group"]),
    (
        "bad parameter value",
        _body(("params",), {"hista": {"d_min": -1}}),
        ["body", "params", "hista", "d_min"],
    ),
    (
        "unknown parameter",
        _body(("params",), {"hista": {"k": 3}}),
        ["body", "params", "hista", "k"],
    ),
    (
        "ids are not integers",
        _body(("groups", 0, "rollouts", 0, "response_ids"), ["four"]),
        ["body", "groups", 0, "rollouts", 0, "response_ids", 0],
    ),
    (
        "id beyond int32",
        _body(("groups", 0, "prompt_ids"), [1, 2**40]),
        ["body", "groups", 0, "prompt_ids", 1],
    ),
    ("groups missing", {"methods": ["hista"]}, ["body", "groups"]),
]


@pytest.mark.parametrize(
    ("body", "location"),
    [case[1:] for case in HTTP_422_CASES],
    ids=[case[0] for case in HTTP_422_CASES],
)
def test_http_422_for_schema_violations(
    server: ServerThread, body: dict[str, Any], location: list[Any]
) -> None:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert location in [error["loc"] for error in response.json()["detail"]]


def test_http_oversize_body_is_413(server: ServerThread) -> None:
    # Valid JSON (trailing whitespace) that is over the limit only by its size.
    content = json.dumps(BODY).encode() + b" " * (MAX_MESSAGE_MB << 20)
    assert len(content) > MAX_MESSAGE_MB << 20
    response = httpx.post(
        f"{server.http_url}/v1/estimate",
        content=content,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["detail"]["message"]
    assert httpx.get(f"{server.http_url}/healthz", timeout=10).status_code == 200
    assert httpx.post(f"{server.http_url}/v1/estimate", json=BODY, timeout=60).status_code == 200


def _chunks(content: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(content), size):
        yield content[start : start + size]


def test_http_body_limit_holds_without_content_length(server: ServerThread) -> None:
    url = f"{server.http_url}/v1/estimate"
    headers = {"content-type": "application/json"}
    # A generator body goes out chunked: the server cannot check a length up front.
    over = json.dumps(BODY).encode() + b" " * (MAX_MESSAGE_MB << 20)
    response = httpx.post(url, content=_chunks(over), headers=headers, timeout=60)
    assert response.status_code == 413, response.text
    # Under the limit the counted body reaches the endpoint intact.
    fine = httpx.post(url, content=_chunks(json.dumps(BODY).encode(), 16), headers=headers)
    assert fine.status_code == 200, fine.text
    assert [len(r["values"]["hista"]) for r in fine.json()["groups"][0]["rollouts"]] == [3, 2]
