"""A training step larger than one request, through two real replicas on loopback.

The servers advertise small per-request limits, so the client splits the step, and keep
Numca's tables in one real Redis; the answer must be the one a single process computes
for the whole step at once, step after step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from statevalue.settings import ServerSettings
from statevalue_client import (
    AsyncValueClient,
    EstimateResult,
    Group,
    Rollout,
    StepFailed,
    StepProgress,
    ValueClient,
)
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.conftest import import_or_skip
from tests.servers import RedisServer, ServerThread, metric_value, running_server

MAX_TOKENS, MAX_GROUPS = 400, 3
GROUPS, G, PROMPT = 12, 4, 10
# Groups carry prompt_ids (two groups per prompt), so Numca reads the shared tables.
METHODS = ("group_mean", "numca", "hista")
PARAMS: dict[str, dict[str, Any]] = {"hista": {"node_spacing": 5, "stride": 2}}
OK = '{frontend="grpc",rpc="Estimate",status="OK"}'


@pytest.fixture(scope="module")
def replicas(backend: TorchBackend, module_redis: RedisServer) -> Iterator[list[ServerThread]]:
    limits = {
        "max_request_tokens": MAX_TOKENS,
        "max_groups_per_request": MAX_GROUPS,
        "numca_store": module_redis.url,
    }
    with running_server(backend, **limits) as one, running_server(backend, **limits) as two:
        yield [one, two]


def target(replicas: list[ServerThread]) -> str:
    return "ipv4:" + ",".join(replica.grpc_target for replica in replicas)


def step_groups(seed: int = 0, prompt_seed: int | None = None) -> list[Group]:
    """GROUPS groups of G short random rollouts with mixed 0/1 rewards, two per prompt_id
    (of ``prompt_seed``, default ``seed``: steps of one seed share their prompts' tables)."""
    prompt_seed = seed if prompt_seed is None else prompt_seed
    rng = np.random.default_rng(seed)
    return [
        Group(
            prompt_ids=rng.integers(100, 40000, PROMPT).astype(np.int32),
            rollouts=[
                Rollout(
                    rng.integers(100, 40000, rng.integers(8, 25)).astype(np.int32), float(j % 2)
                )
                for j in range(G)
            ],
            group_id=f"q{i}",
            prompt_id=f"s{prompt_seed}-p{i % (GROUPS // 2)}",
        )
        for i in range(GROUPS)
    ]


def one_process(
    engine: Engine, *steps: list[Group], methods: tuple[str, ...] = METHODS, **params: Any
) -> EstimateResult:
    """Each step in one engine call, in a fresh engine of this process; the last answer
    (``methods``; the steps before it only count Numca's tables)."""
    fresh = Engine(engine.backend)
    for number, groups in enumerate(steps, 1):
        request = EstimateRequest(
            groups=[
                GroupInput(
                    prompt_ids=np.asarray(g.prompt_ids),
                    rollouts=[
                        RolloutInput(np.asarray(r.response_ids), reward=r.reward)
                        for r in g.rollouts
                    ],
                    group_id=g.group_id,
                    prompt_id=g.prompt_id or None,
                )
                for g in groups
            ],
            methods=methods if number == len(steps) else ("numca",),
            config=EstimatorConfig.model_validate(params),
        )
        result = fresh.estimate(request)
    return result  # type: ignore[return-value]


def assert_same(
    result: EstimateResult,
    expected: Any,
    groups: list[Group],
    methods: tuple[str, ...] = METHODS,
) -> None:
    assert [g.group_id for g in result.groups] == [g.group_id for g in groups]
    for got, want, sent in zip(result.groups, expected.groups, groups, strict=True):
        assert len(got.rollouts) == len(sent.rollouts)
        for rollout, reference, source in zip(
            got.rollouts, want.rollouts, sent.rollouts, strict=True
        ):
            for method in methods:
                values = rollout.values[method]
                assert len(values) == len(source.response_ids)
                np.testing.assert_allclose(values, reference.values[method], rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(
                    rollout.advantages[method], reference.advantages[method], rtol=1e-4, atol=1e-4
                )


def ok_counts(replicas: list[ServerThread]) -> list[float]:
    return [metric_value(r.metrics(), "statevalue_requests_total", OK) for r in replicas]


@pytest.mark.parametrize("scale", ["group", "batch"])
def test_a_split_step_equals_one_process(
    replicas: list[ServerThread], engine: Engine, scale: str, caplog: pytest.LogCaptureFixture
) -> None:
    groups = step_groups()
    params = {**PARAMS, "advantage": {"scale": scale}}
    # Hista's values do not depend on the scale: the group case covers them, the batch
    # case scales the model-free methods' advantages by the whole step's statistics.
    methods = METHODS if scale == "group" else ("group_mean", "numca")
    seen: list[StepProgress] = []
    before = ok_counts(replicas)
    with caplog.at_level(logging.INFO, logger="statevalue.grpc_server"):
        with ValueClient(target(replicas), max_in_flight=3) as client:
            limits = client.request_limits()
            result = client.estimate(groups, methods, progress=seen.append, **params)
    assert (limits.max_tokens, limits.max_groups) == (MAX_TOKENS, MAX_GROUPS)
    expected = one_process(engine, groups, methods=methods, **params)
    assert_same(result, expected, groups, methods)
    # Several requests, spread over both replicas, each within the limits.
    served = [after - b for after, b in zip(ok_counts(replicas), before, strict=True)]
    total = sum(
        len(g.prompt_ids) * G + sum(len(r.response_ids) for r in g.rollouts) for g in groups
    )
    # The last report: all done, nothing left to wait for.
    assert seen[-1].eta_s == 0.0 and seen[-1].elapsed_s > 0
    assert replace(seen[-1], elapsed_s=0.0, eta_s=None) == StepProgress(
        requests_done=seen[-1].requests_total,
        requests_total=seen[-1].requests_total,
        groups_done=GROUPS,
        groups_total=GROUPS,
        tokens_done=total,
        tokens_total=total,
    )
    assert len(seen) == seen[-1].requests_total == sum(served) >= GROUPS // MAX_GROUPS
    assert all(count > 0 for count in served), served
    assert [p.tokens_done for p in seen] == sorted(p.tokens_done for p in seen)
    # Every request of the step carried its step id.
    logged = [
        r.getMessage() for r in caplog.records if f"step_id={result.step_id}" in r.getMessage()
    ]
    assert len(logged) == sum(served) and all("status=OK" in line for line in logged)


def test_the_async_client_splits_the_same_way(
    replicas: list[ServerThread], engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    groups = step_groups(1)

    async def run() -> EstimateResult:
        async with AsyncValueClient(target(replicas), max_in_flight=2) as client:
            return await client.estimate(
                groups, METHODS, step_id="step-7", progress_bar=True, **PARAMS
            )

    result = asyncio.run(run())
    assert result.step_id == "step-7"
    bar = capsys.readouterr().err
    assert "statevalue step" in bar and "100%" in bar
    assert_same(result, one_process(engine, groups, **PARAMS), groups)


@pytest.mark.parametrize("method", ["hista", "numca"])
def test_the_verl_adapter_through_two_replicas(
    replicas: list[ServerThread], engine: Engine, method: str
) -> None:
    import_or_skip("verl")
    from verl import DataProto

    from statevalue_client.verl import compute_statevalue_advantage

    groups = step_groups(2)
    rows = [(g.group_id, g.prompt_ids, r) for g in groups for r in g.rollouts]
    prompt_keys = [g.prompt_id for g in groups for _ in g.rollouts]
    width, length = PROMPT, max(len(r.response_ids) for _, _, r in rows) + 2
    prompts = torch.zeros((len(rows), width), dtype=torch.int64)
    responses = torch.zeros((len(rows), length), dtype=torch.int64)
    mask = torch.zeros((len(rows), width + length), dtype=torch.int64)
    rewards = torch.zeros((len(rows), length))
    for i, (_, prompt, rollout) in enumerate(rows):
        n = len(rollout.response_ids)
        prompts[i] = torch.as_tensor(prompt)
        responses[i, :n] = torch.as_tensor(rollout.response_ids)
        mask[i, : width + n] = 1
        rewards[i, n - 1] = rollout.reward
    order = np.random.default_rng(0).permutation(len(rows))
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "attention_mask": mask,
            "response_mask": mask[:, width:].clone(),
            "token_level_rewards": rewards,
        },
        non_tensors={
            "uid": np.array([uid for uid, _, _ in rows], dtype=object),
            "index": np.array(prompt_keys, dtype=object),
        },
    )
    data.reorder(torch.as_tensor(order))
    with ValueClient(target(replicas)) as client:
        compute_statevalue_advantage(data, client, method, PARAMS, prompt_key="index")
    expected = one_process(engine, groups, methods=(method,), **PARAMS)
    for row, source in enumerate(order.tolist()):
        group, rollout = divmod(source, G)
        want = expected.groups[group].rollouts[rollout]
        n = len(want.values[method])
        np.testing.assert_allclose(
            data.batch["values"][row, :n].numpy(), want.values[method], rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            data.batch["advantages"][row, :n].numpy(),
            want.advantages[method],
            rtol=1e-4,
            atol=1e-4,
        )
        assert not data.batch["values"][row, n:].any()


def test_numca_tables_are_shared_step_after_step(
    replicas: list[ServerThread], engine: Engine
) -> None:
    first = step_groups(6)
    # The next step's groups of the same prompts, with ids of their own.
    second = [replace(g, group_id=f"next-{g.group_id}") for g in step_groups(7, prompt_seed=6)]
    with ValueClient(target(replicas), max_in_flight=2) as client:
        # Only Numca's tables carry over from one step to the next.
        client.estimate(first, ("numca",), **PARAMS)
        result = client.estimate(second, METHODS, **PARAMS)
        # A retry of the first step (same ids, same content) counts nothing again...
        client.estimate(first, ("numca",), **PARAMS)
        again = client.estimate(second, ("numca",), **PARAMS)
        # ...while ids reused with other rollouts are refused, naming the group.
        reused = step_groups(7, prompt_seed=6)
        with pytest.raises(StepFailed) as caught:
            client.estimate(reused, ("numca",), **PARAMS)
    expected = one_process(engine, first, second, **PARAMS)
    assert_same(result, expected, second)
    assert_same(again, expected, second, ("numca",))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already counted" in str(caught.value) and "group_id" in str(caught.value)
    repeated = sum(
        metric_value(r.metrics(), "statevalue_numca_groups_total", '{outcome="repeated"}')
        for r in replicas
    )
    assert repeated >= 2 * GROUPS


def test_a_failed_request_names_its_groups(replicas: list[ServerThread]) -> None:
    # No prompt_ids: requests follow the groups' order, as the check below assumes.
    groups = [replace(g, prompt_id="") for g in step_groups(3)]
    # A token id outside the vocabulary: the server refuses that request (not retried).
    groups[7].rollouts[0].response_ids = np.array([5, 10**6], dtype=np.int32)
    with ValueClient(target(replicas), max_in_flight=1) as client:
        with pytest.raises(StepFailed) as caught:
            client.estimate(groups, ("group_mean",))
    failure = caught.value
    assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "q7" in failure.failed_groups and "q7" in str(failure)
    assert "outside the vocabulary" in str(failure)
    # One request at a time: the ones after the failure were never sent, and say so.
    assert failure.unsent_groups and set(failure.unsent_groups).isdisjoint(failure.failed_groups)
    assert max(int(name[1:]) for name in failure.failed_groups) < min(
        int(name[1:]) for name in failure.unsent_groups
    )


def test_duplicate_group_ids_are_refused_before_sending(replicas: list[ServerThread]) -> None:
    groups = step_groups(4)
    groups[5].group_id = groups[2].group_id = "twice"
    before = ok_counts(replicas)
    with ValueClient(target(replicas)) as client:
        with pytest.raises(
            ValueError, match=r"duplicate group ids in one step: 'twice' \(groups 2, 5\)"
        ):
            client.estimate(groups, ("group_mean",))
    assert ok_counts(replicas) == before


def test_a_request_over_the_limit_is_refused_saying_split_it(replicas: list[ServerThread]) -> None:
    rng = np.random.default_rng(5)
    # One group of 4 x (10 + 100) = 440 tokens: over the token limit.
    group = Group(
        rng.integers(100, 40000, PROMPT), [Rollout(rng.integers(100, 40000, 100), 1.0)] * G
    )
    big = build_request([group], ["group_mean"], {})
    with grpc.insecure_channel(replicas[0].grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.ValueServiceStub(channel).Estimate(big, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("groups: ") and "split it" in caught.value.details()
    body = {
        "methods": ["group_mean"],
        "groups": [
            {
                "prompt_ids": np.asarray(g.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in g.rollouts
                ],
            }
            for g in step_groups(5)[: MAX_GROUPS + 1]
        ],
    }
    answer = httpx.post(f"{replicas[0].http_url}/v1/estimate", json=body, timeout=60)
    assert answer.status_code == 400
    assert answer.json()["detail"]["field"] == "groups"
    assert "split it" in answer.json()["detail"]["message"]
    info = httpx.get(f"{replicas[0].http_url}/v1/model", timeout=10).json()
    assert (info["max_request_tokens"], info["max_request_groups"]) == (MAX_TOKENS, MAX_GROUPS)


def test_the_request_limit_must_fit_the_queue() -> None:
    with pytest.raises(ValidationError, match="max_request_tokens .* must not exceed"):
        ServerSettings(max_request_tokens=2_000, max_queue_tokens=1_000)
