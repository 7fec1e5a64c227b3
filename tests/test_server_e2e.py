"""gRPC and HTTP end to end on a real server and the real embedded model.

Both front ends must give exactly what the in-process engine gives, merge concurrent
callers into shared forward batches, and drop work whose deadline passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, EstimateResult, GroupInput, RolloutInput
from statevalue_client import AsyncValueClient, Group, Rollout, ValueClient
from statevalue_client import EstimateResult as ClientResult
from tests.servers import (
    SERVING,
    ServerThread,
    client_group,
    json_group,
    metric_value,
    running_server,
)

ALL = ("numca", "hista", "group_mean")
MODEL_NAME = "SmolLM2-135M-Instruct"
# Short spacings give the ~100-token sampled responses several segments per method.
PARAMS: dict[str, dict[str, Any]] = {
    "hista": {"node_spacing": 10, "d_min": 1.0},
    "numca": {"merge_distance": 5},
}
CONFIG = EstimatorConfig.model_validate(PARAMS)
README_EXAMPLE: dict[str, Any] = {
    "methods": ["numca", "hista", "group_mean"],
    "groups": [
        {
            "group_id": "g1",
            "prompt_id": "optional-stable-id",
            "prompt_ids": [1780, 314, 216, 34, 1232, 216, 35, 47],
            "rollouts": [
                {"response_ids": [657, 314, 216, 37, 30], "reward": 1.0},
                {"response_ids": [216, 38, 30], "reward": 0.0},
            ],
        }
    ],
}

# One method's (values, advantages, boundaries) per rollout, per group: a common shape for
# engine, gRPC and JSON answers.
Table = list[tuple[str, list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]]]


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    """One ready server for the module; 50 ms of batch wait makes merging deterministic."""
    with running_server(backend, max_wait_ms=50) as running:
        yield running


def engine_table(result: EstimateResult) -> Table:
    return [
        (
            g.group_id,
            [
                {m: (r.values[m], r.advantages[m], r.boundaries[m]) for m in r.values}
                for r in g.rollouts
            ],
        )
        for g in result.groups
    ]


def client_table(result: ClientResult) -> Table:
    return [
        (
            g.group_id,
            [
                {m: (r.values[m], r.advantages[m], r.boundaries[m]) for m in r.values}
                for r in g.rollouts
            ],
        )
        for g in result.groups
    ]


def json_table(body: dict[str, Any]) -> Table:
    return [
        (
            g["group_id"],
            [
                {
                    m: (
                        np.asarray(r["values"][m], dtype=np.float64),
                        np.asarray(r["advantages"][m], dtype=np.float64),
                        np.asarray(r["boundaries"][m], dtype=np.int64),
                    )
                    for m in r["values"]
                }
                for r in g["rollouts"]
            ],
        )
        for g in body["groups"]
    ]


def assert_same(got: Table, want: Table) -> None:
    """Same groups, rollouts and methods; values and advantages within 1e-5."""
    assert [g for g, _ in got] == [g for g, _ in want]
    for (group_id, got_rollouts), (_, want_rollouts) in zip(got, want, strict=True):
        assert len(got_rollouts) == len(want_rollouts), group_id
        for j, (a, b) in enumerate(zip(got_rollouts, want_rollouts, strict=True)):
            assert sorted(a) == sorted(b), (group_id, j)
            for method in b:
                values, advantages, boundaries = a[method]
                assert values.shape == b[method][0].shape, (group_id, j, method)
                np.testing.assert_allclose(values, b[method][0], atol=1e-5, rtol=0)
                np.testing.assert_allclose(advantages, b[method][1], atol=1e-5, rtol=0)
                np.testing.assert_array_equal(boundaries, b[method][2])


@pytest.fixture(scope="module")
def reference(engine: Engine, sampled_group: GroupInput) -> EstimateResult:
    """The in-process engine's answer for the sampled group."""
    return engine.estimate(EstimateRequest(groups=[sampled_group], methods=ALL, config=CONFIG))


def test_grpc_matches_engine(
    server: ServerThread, sampled_group: GroupInput, reference: EstimateResult
) -> None:
    with ValueClient(server.grpc_target) as client:
        result = client.estimate([client_group(sampled_group)], ALL, **PARAMS)
        info = client.model_info()
    assert (result.model.name, result.model.version) == (
        reference.model.name,
        reference.model.version,
    )
    assert result.model.name == MODEL_NAME and result.model.version
    assert_same(client_table(result), engine_table(reference))
    # The short spacings are not ignored on the way: Hista moves away from the group mean.
    mean = np.mean([r.reward for r in sampled_group.rollouts])
    assert any(np.abs(r.values["hista"] - mean).max() > 1e-3 for r in result.groups[0].rollouts)
    assert result.forward_seconds > 0
    assert (info.name, info.version) == (result.model.name, result.model.version)
    assert info.vocab_size > 0 and info.hidden_size > 0 and info.max_length > 0
    # The torch backend answered, on the forward path it was built with, and the throughput
    # it advertises comes from the forward step that just ran.
    assert (info.backend, info.forward_path) == (
        "torch",
        server.server.scheduler.engine.backend.forward_path,
    )
    assert info.tokens_per_second > 0


def test_http_matches_engine(
    server: ServerThread, sampled_group: GroupInput, reference: EstimateResult
) -> None:
    body = {"methods": list(ALL), "params": PARAMS, "groups": [json_group(sampled_group)]}
    response = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    model = answer["model"]
    assert (model["name"], model["version"]) == (reference.model.name, reference.model.version)
    assert_same(json_table(answer), engine_table(reference))
    info = httpx.get(f"{server.http_url}/v1/model", timeout=10).json()
    assert (info["name"], info["version"]) == (reference.model.name, reference.model.version)
    assert info["backend"] == "torch" and info["forward_path"] in (
        "padded",
        "packed",
        "prompt_once",
    )
    assert info["tokens_per_second"] > 0


def test_readme_json_example(server: ServerThread, engine: Engine) -> None:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=README_EXAMPLE, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"]["name"] == MODEL_NAME
    assert answer["model"]["version"] == engine.model.version
    (group,) = answer["groups"]
    assert group["group_id"] == "g1"
    assert [len(r["values"]["numca"]) for r in group["rollouts"]] == [5, 3]
    for rollout, length, reward in zip(group["rollouts"], (5, 3), (1.0, 0.0), strict=True):
        assert sorted(rollout["values"]) == sorted(ALL)
        for method in ALL:
            assert len(rollout["values"][method]) == length
            assert len(rollout["advantages"][method]) == length
            assert all(isinstance(v, float) for v in rollout["values"][method])
        # Two rollouts, rewards 1 and 0: the baseline is 0.5 and the advantage has its sign.
        np.testing.assert_allclose(rollout["values"]["group_mean"], 0.5, rtol=1e-6)
        assert np.sign(rollout["advantages"]["group_mean"][0]) == np.sign(reward - 0.5)


def distinct_group(sampled_group: GroupInput, k: int) -> GroupInput:
    """Client k's own group: its own responses, lengths and rewards."""
    responses = [r.response_ids for r in sampled_group.rollouts]
    assert sampled_group.prompt_ids is not None
    return GroupInput(
        group_id=f"client-{k}",
        prompt_ids=np.concatenate([sampled_group.prompt_ids[-12:], [k + 100]]).astype(np.int32),
        rollouts=[
            RolloutInput(
                response_ids=responses[(k + 3 * j) % len(responses)][: 12 + (k + j) % 9],
                reward=((k + j) % 4) / 3,
            )
            for j in range(3)
        ],
    )


CONCURRENT_PARAMS: dict[str, dict[str, Any]] = {
    "hista": {"node_spacing": 4, "d_min": 0.5},
    "numca": {"merge_distance": 2},
}


def test_concurrent_clients_get_their_own_answers_from_merged_batches(
    server: ServerThread, engine: Engine, sampled_group: GroupInput
) -> None:
    groups = [distinct_group(sampled_group, k) for k in range(32)]
    config = EstimatorConfig.model_validate(CONCURRENT_PARAMS)
    # Groups are independent (group-scaled advantages, no prompt_id), so one engine call
    # gives every client's expected answer.
    expected = engine_table(
        engine.estimate(EstimateRequest(groups=groups, methods=ALL, config=config))
    )
    before = server.metrics()

    async def one(group: GroupInput) -> ClientResult:
        async with AsyncValueClient(server.grpc_target, retries=0) as client:
            return await client.estimate([client_group(group)], ALL, **CONCURRENT_PARAMS)

    async def all_clients() -> list[ClientResult]:
        return await asyncio.gather(*(one(g) for g in groups))

    results = asyncio.run(all_clients())
    for k, result in enumerate(results):
        assert result.model.name == MODEL_NAME
        assert_same(client_table(result), [expected[k]])
    after = server.metrics()
    batches = metric_value(after, "statevalue_batch_requests_count") - metric_value(
        before, "statevalue_batch_requests_count"
    )
    merged = metric_value(after, "statevalue_batch_requests_sum") - metric_value(
        before, "statevalue_batch_requests_sum"
    )
    # Every hista request went through the model (a request may span several time-sized
    # micro-batches), and micro-batches carried several requests at once.
    assert merged >= 32
    assert 1 <= batches < merged
    singles = metric_value(after, "statevalue_batch_requests_bucket", '{le="1.0"}')
    assert singles < metric_value(after, "statevalue_batch_requests_count")
    assert metric_value(after, "statevalue_queue_depth") == 0


def big_group(sampled_group: GroupInput, rollouts: int, length: int) -> Group:
    """A group of ``rollouts`` responses of ``length`` real token ids each."""
    assert sampled_group.prompt_ids is not None
    pool = np.concatenate([r.response_ids for r in sampled_group.rollouts])
    return Group(
        prompt_ids=np.asarray(sampled_group.prompt_ids, dtype=np.int32),
        rollouts=[
            Rollout(response_ids=np.roll(pool, 37 * j)[:length], reward=float(j % 2))
            for j in range(rollouts)
        ],
    )


SMALL = Group(
    prompt_ids=[1, 2, 3],
    rollouts=[Rollout([4, 5, 6], 1.0), Rollout([7, 8], 0.0)],
    group_id="small",
)


ENDED = ("OK", "CANCELLED", "DEADLINE_EXCEEDED")


def grpc_status(code: str) -> str:
    return f'{{frontend="grpc",rpc="Estimate",status="{code}"}}'


def test_grpc_deadline_drops_the_work(server: ServerThread, sampled_group: GroupInput) -> None:
    big = big_group(sampled_group, rollouts=8, length=300)
    page = server.metrics()
    before = {
        name: metric_value(page, "statevalue_requests_total", grpc_status(name)) for name in ENDED
    }
    tokens = metric_value(page, "statevalue_tokens_total")
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([big], ["hista"], timeout=0.05)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The server stays healthy and serves the next request.
        assert server.health() == SERVING
        result = client.estimate([SMALL], ["hista"])
    assert [len(r.values["hista"]) for r in result.groups[0].rollouts] == [3, 2]
    page = server.metrics()
    # The expired request stopped: at most the micro-batch running when its deadline passed
    # reached the model, never the whole request; the small one went through whole.
    big_tokens = sum(len(big.prompt_ids) + len(r.response_ids) for r in big.rollouts)
    extra = metric_value(page, "statevalue_tokens_total") - tokens - (3 + 3 + 3 + 2)
    assert 0 <= extra < big_tokens
    # ... and it is counted as ended early, not as answered.
    after = {
        name: metric_value(page, "statevalue_requests_total", grpc_status(name)) for name in ENDED
    }
    assert after["OK"] == before["OK"] + 1
    assert after["CANCELLED"] + after["DEADLINE_EXCEEDED"] == (
        before["CANCELLED"] + before["DEADLINE_EXCEEDED"] + 1
    )
    assert metric_value(page, "statevalue_queue_depth") == 0
    assert httpx.get(f"{server.http_url}/readyz", timeout=10).status_code == 200


def test_http_request_timeout_header(server: ServerThread, sampled_group: GroupInput) -> None:
    big = big_group(sampled_group, rollouts=8, length=300)
    body = {
        "methods": ["hista"],
        "groups": [
            {
                "prompt_ids": np.asarray(big.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in big.rollouts
                ],
            }
        ],
    }
    url = f"{server.http_url}/v1/estimate"
    expired = httpx.post(url, json=body, headers={"x-request-timeout": "0.01"}, timeout=60)
    assert expired.status_code == 504, expired.text
    assert "deadline" in expired.json()["detail"]["message"]
    for bad in ("soon", "-1", "nan"):
        refused = httpx.post(url, json=README_EXAMPLE, headers={"x-request-timeout": bad})
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["detail"]["field"] == "x-request-timeout"
    fine = httpx.post(url, json=README_EXAMPLE, headers={"x-request-timeout": "60"}, timeout=60)
    assert fine.status_code == 200, fine.text
