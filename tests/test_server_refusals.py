"""Inputs that used to crash or mislead, refused cleanly on both front ends.

Non-finite estimator parameters (NaN passes every bound check, inf overflows a length
derived from a fraction), a ``tau`` whose weights overflow, caller strings that an error
would echo into gRPC metadata, a body sent without the API token, and readiness while
the Numca store is down.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import grpc
import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.conftest import redis_or_skip
from tests.servers import ServerThread, running_server, wait_for

BODY = {
    "methods": ["hista", "numca", "group_mean"],
    "groups": [
        {
            "group_id": "g",
            "prompt_ids": [1, 2, 3],
            "rollouts": [
                {"response_ids": [4, 5, 6, 7], "reward": 1.0},
                {"response_ids": [8, 9], "reward": 0.0},
            ],
        }
    ],
}

# Every float parameter; relative_merge_distance and relative_node_spacing are fractions
# whose inf used to overflow.
FLOAT_PARAMETERS = [
    ("advantage", "scale_eps"),
    ("advantage", "gamma"),
    ("advantage", "lam"),
    ("hista", "tau"),
    ("hista", "ema_alpha"),
    ("hista", "own_weight"),
    ("hista", "d_min"),
    ("hista", "relative_d_min"),
    ("hista", "relative_node_spacing"),
    ("numca", "prior_count"),
    ("numca", "relative_merge_distance"),
]
TOKEN = "api-token-3e9a"


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.ValueServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield pb_grpc.ValueServiceStub(channel)


def post_raw(server: ServerThread, body: dict[str, object], **headers: str) -> httpx.Response:
    """POST ``body`` as JSON with NaN / Infinity literals (as Python's json writes them)."""
    content = json.dumps(body, allow_nan=True)
    headers = {"content-type": "application/json", **headers}
    url = f"{server.http_url}/v1/estimate"
    return httpx.post(url, content=content, headers=headers, timeout=60)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("section", "name"), FLOAT_PARAMETERS)
def test_non_finite_parameters_are_refused_naming_the_field(
    server: ServerThread,
    stub: pb_grpc.ValueServiceStub,
    section: str,
    name: str,
    value: float,
) -> None:
    response = post_raw(server, {**BODY, "params": {section: {name: value}}})
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert ["body", "params", section, name] in [e["loc"] for e in errors]
    request = build_request(
        [Group([1, 2, 3], [Rollout([4, 5, 6, 7], 1.0), Rollout([8, 9], 0.0)])],
        ["hista"],
        {section: {name: value}},
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Estimate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(f"params.{section}.{name}: ")


def test_a_huge_relative_length_is_capped_not_an_overflow(server: ServerThread) -> None:
    params = {
        "hista": {"relative_node_spacing": 1e308},
        "numca": {"relative_merge_distance": 1e308},
    }
    response = post_raw(server, {**BODY, "params": params})
    assert response.status_code == 200, response.text


def test_hista_weights_that_overflow_name_tau(server: ServerThread) -> None:
    # Two identical responses: their nodes are at distance 0, clamped to d_min = 0.001,
    # and 0.001 ** -1000 overflows.
    body = {
        "methods": ["hista"],
        "params": {"hista": {"tau": 1000.0, "d_min": 0.001, "node_spacing": 1}},
        "groups": [
            {
                "prompt_ids": [1, 2, 3],
                "rollouts": [
                    {"response_ids": [4, 5, 6, 7, 8, 9], "reward": 1.0},
                    {"response_ids": [4, 5, 6, 7, 8, 9], "reward": 0.0},
                ],
            }
        ],
    }
    response = post_raw(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"]["field"] == "params.hista.tau"


def test_echoed_caller_strings_are_cut(
    server: ServerThread, stub: pb_grpc.ValueServiceStub
) -> None:
    long_id = "x" * 20_000
    group = Group([1, 2, 3], [Rollout([4, 5], 1.0)], group_id=long_id)
    request = build_request([group, group], ["group_mean"], {})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Estimate(request, timeout=60)
    # Uncut, the 40 KB of details overflow gRPC's metadata limit and the call ends in
    # RESOURCE_EXHAUSTED, which a client retries.
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert details.startswith("groups[1].group_id: ") and len(details) <= 1300
    body = {
        "methods": ["group_mean"],
        "groups": [BODY["groups"][0] | {"group_id": long_id}] * 2,
    }
    response = post_raw(server, body)
    assert response.status_code == 400
    assert len(response.json()["detail"]["message"]) <= 1000
    # A schema error quotes no long input either.
    response = post_raw(server, {**BODY, long_id: 1})
    assert response.status_code == 422
    assert len(response.content) < 2000, len(response.content)


@pytest.fixture(scope="module")
def guarded(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend, api_token=TOKEN) as running:
        yield running


def test_the_api_token_is_checked_before_the_body(guarded: ServerThread) -> None:
    url = f"{guarded.http_url}/v1/estimate"
    # Schema-invalid, and not JSON at all (24 MB): both 401, so neither was parsed.
    invalid = httpx.post(url, json={"groups": "none"}, timeout=60)
    assert invalid.status_code == 401, invalid.text
    garbage = httpx.post(url, content=b"{" + b"x" * (24 << 20), timeout=120)
    assert garbage.status_code == 401, garbage.text
    # With the token, the same bodies meet the schema.
    token = {"authorization": f"Bearer {TOKEN}"}
    assert httpx.post(url, json={"groups": "none"}, headers=token, timeout=60).status_code == 422


def test_readyz_fails_while_the_numca_store_is_down(
    backend: TorchBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    redis = redis_or_skip(tmp_path_factory.mktemp("readyz") / "redis")
    try:
        with running_server(backend, numca_store=redis.url) as server:
            url = f"{server.http_url}/readyz"
            assert httpx.get(url, timeout=30).status_code == 200
            redis.kill()
            down = httpx.get(url, timeout=30)
            assert down.status_code == 503
            assert "Numca store" in down.json()["detail"]["message"]
            redis.start()
            wait_for(lambda: httpx.get(url, timeout=30).status_code == 200, 60, "ready again")
    finally:
        redis.kill()
