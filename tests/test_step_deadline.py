"""A whole step through the client against a real server: time belongs to the step.

The step outlasts the server's time limits and still completes with the client's
defaults; a step past its deadline keeps what finished, and resuming it sends only the
rest and counts nothing twice; a split step gets the advantages of one request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import (
    EstimateResult,
    Group,
    Rollout,
    StepFailed,
    StepProgress,
    ValueClient,
)
from tests.servers import ServerThread, hold_model, metric_value, running_server


def step_groups(count: int, length: int, seed: int = 0, prompt_ids: bool = False) -> list[Group]:
    rng = np.random.default_rng(seed)
    return [
        Group(
            rng.integers(100, 20000, 16).astype(np.int32),
            [
                Rollout(rng.integers(100, 20000, length).astype(np.int32), float(j % 2))
                for j in range(4)
            ],
            group_id=f"g{i}",
            prompt_id=f"p{i}" if prompt_ids else "",
        )
        for i in range(count)
    ]


@pytest.fixture
def params_server(backend: TorchBackend, tmp_path: Path) -> Iterator[ServerThread]:
    """A server whose params file makes batch scaling the default, with a small request limit."""
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"advantage": {"scale": "batch"}}))
    with running_server(backend, params_file=params, max_request_tokens=150) as server:
        yield server


def test_batch_scaling_set_by_the_server_spans_a_split_step(params_server: ServerThread) -> None:
    # Two groups of different reward spreads, one request each under the 150-token limit.
    groups = [
        Group([5] * 10, [Rollout([7] * 40, 1.0), Rollout([8] * 40, 0.0)], group_id="wide"),
        Group([6] * 10, [Rollout([7] * 40, 0.5), Rollout([8] * 40, 0.25)], group_id="narrow"),
    ]
    seen: list[StepProgress] = []
    with ValueClient(params_server.grpc_target) as client:
        result = client.estimate(groups, ("group_mean",), progress=seen.append)
    assert seen[-1].requests_total == 2
    rewards = np.array([1.0, 0.0, 0.5, 0.25])
    scale = rewards.std(ddof=1) + 1e-4  # the whole step's rewards, as one request would
    expected = [(1.0 - 0.5) / scale, (0.5 - 0.375) / scale]
    got = [float(g.rollouts[0].advantages["group_mean"][0]) for g in result.groups]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_a_step_that_outlasts_the_time_limits_completes_with_client_defaults(
    backend: TorchBackend,
) -> None:
    # Limits a few seconds long; the step is about three times the longest of them.
    queue_wait, connection_age = 2.0, 6.0
    with running_server(
        backend,
        warmup=True,
        max_queue_wait_s=queue_wait,
        max_connection_age_s=connection_age,
    ) as server:
        with ValueClient(server.grpc_target) as client:
            throughput = client.model_info().tokens_per_second
            assert throughput > 0  # measured by the warm-up, advertised from the start
            per_group = 4 * (16 + 48)
            count = max(8, int(3 * connection_age * throughput / per_group))
            groups = step_groups(count, 48)
            seen: list[StepProgress] = []
            result = client.estimate(groups, ("hista", "group_mean"), progress=seen.append)
        refused = metric_value(
            server.metrics(),
            "statevalue_requests_total",
            '{frontend="grpc",rpc="Estimate",status="RESOURCE_EXHAUSTED"}',
        )
    print(
        f"step: {count} groups, {count * per_group} tokens at {throughput:.0f} tokens/s "
        f"(about {count * per_group / throughput:.1f} s of work), {len(seen)} requests, "
        f"{refused:.0f} refusals retried, {seen[-1].elapsed_s:.1f} s"
    )
    assert [g.group_id for g in result.groups] == [g.group_id for g in groups]
    assert all(len(r.values["hista"]) == 48 for g in result.groups for r in g.rollouts)
    # Cut into many requests of a few seconds each, so progress came step by step.
    assert len(seen) == seen[-1].requests_total > 3
    assert seen[0].tokens_done < seen[-1].tokens_total


def one_shot(
    backend: TorchBackend, groups: list[Group], methods: tuple[str, ...]
) -> EstimateResult:
    """The same step on a fresh server, in one go."""
    with running_server(backend) as fresh, ValueClient(fresh.grpc_target) as client:
        return client.estimate(groups, methods)


def assert_same_values(got: EstimateResult, want: EstimateResult, methods: tuple[str, ...]) -> None:
    assert [g.group_id for g in got.groups] == [g.group_id for g in want.groups]
    for a_group, b_group in zip(got.groups, want.groups, strict=True):
        for a, b in zip(a_group.rollouts, b_group.rollouts, strict=True):
            for method in methods:
                np.testing.assert_allclose(a.values[method], b.values[method], atol=1e-5)


def test_a_step_past_its_deadline_fails_and_its_step_id_resumes_it(
    backend: TorchBackend,
) -> None:
    methods = ("hista", "numca")
    groups = step_groups(4, 24, seed=1, prompt_ids=True)
    with running_server(backend, max_request_tokens=300) as server:
        with ValueClient(server.grpc_target) as client:
            with hold_model(backend), pytest.raises(StepFailed) as caught:
                client.estimate(groups, methods, deadline=2.0, step_id="step-1")
            failure = caught.value
            assert failure.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "deadline" in str(failure) and failure.unfinished == [0, 1, 2, 3]
            # The same step id on the same client resumes it.
            resumed = client.estimate(groups, methods, step_id="step-1")
        repeated = metric_value(
            server.metrics(), "statevalue_numca_groups_total", '{outcome="repeated"}'
        )
    assert resumed.step_id == "step-1"
    assert repeated == 0  # the expired requests counted nothing
    assert_same_values(resumed, one_shot(backend, groups, methods), methods)


def test_a_failed_step_keeps_what_finished_and_resume_sends_only_the_rest(
    backend: TorchBackend,
) -> None:
    methods = ("hista", "numca", "group_mean")
    groups = step_groups(6, 24, seed=2, prompt_ids=True)
    broken = [Group(g.prompt_ids, list(g.rollouts), g.group_id, g.prompt_id) for g in groups]
    # The last group carries a token outside the vocabulary: its request is refused.
    bad = np.array(groups[5].rollouts[0].response_ids)
    bad[3] = 10**6
    broken[5].rollouts[0] = Rollout(bad, groups[5].rollouts[0].reward)
    ok = '{frontend="grpc",rpc="Estimate",status="OK"}'
    with running_server(backend, max_request_tokens=300) as server:
        with ValueClient(server.grpc_target, max_in_flight=1) as client:
            with pytest.raises(StepFailed) as caught:
                client.estimate(broken, methods)
            failure = caught.value
            assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "g5" in failure.failed_groups
            assert failure.finished and 5 in failure.unfinished
            answered = metric_value(server.metrics(), "statevalue_requests_total", ok)
            resumed = client.estimate(groups, methods, resume=failure)
            resent = metric_value(server.metrics(), "statevalue_requests_total", ok) - answered
        repeated = metric_value(
            server.metrics(), "statevalue_numca_groups_total", '{outcome="repeated"}'
        )
    # Only the unfinished groups went again (at most one request per unfinished group).
    assert 1 <= resent <= len(failure.unfinished)
    assert resumed.step_id == failure.step_id
    assert repeated == 0
    assert_same_values(resumed, one_shot(backend, groups, methods), methods)
