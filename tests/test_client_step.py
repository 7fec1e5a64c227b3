"""The client's step logic alone: requests sized by time, retries, deadlines and resuming.

``Step`` does no I/O, so these tests drive it with a clock of their own and answers built
the way the server builds them; the end-to-end behaviour over a real server is in
tests/test_step_deadline.py.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from statevalue_client import Group, Rollout, StepFailed
from statevalue_client.arrays import pack_float32, pack_int32
from statevalue_client.chunking import RequestLimits
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.step import (
    REQUEST_TIMEOUT_FLOOR_S,
    REQUEST_TIMEOUT_WORK_FACTOR,
    RetryPolicy,
    Step,
)
from statevalue_client.wire import content_step_id


class Refusal(grpc.RpcError):
    """A status as a call reports it: code, details and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, retry_after: float | None = None, details: str = ""
    ) -> None:
        super().__init__(code.name)
        self._code = code
        self._retry_after = retry_after
        self._details = details or code.name.lower()

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return () if self._retry_after is None else (("retry-after", str(self._retry_after)),)


def groups(n: int, tokens: int = 100) -> list[Group]:
    return [
        Group(
            [1] * 10,
            [Rollout([2] * (tokens // 2 - 10), 1.0), Rollout([3] * (tokens // 2 - 10), 0.0)],
            group_id=f"g{i}",
        )
        for i in range(n)
    ]


def answer(request: pb.EstimateRequest) -> pb.EstimateResponse:
    """A response of the server's shape; each value is the group's position in the step."""
    response = pb.EstimateResponse(model=pb.ModelInfo(name="m", version="v"))
    for group in request.groups:
        out = response.groups.add(group_id=group.group_id)
        value = float(group.group_id[1:])
        for rollout in group.rollouts:
            n = rollout.num_tokens
            item = out.rollouts.add(num_tokens=n)
            item.methods["group_mean"].values = pack_float32(np.full(n, value))
            item.methods["group_mean"].advantages = pack_float32(np.zeros(n))
            item.methods["group_mean"].boundaries = pack_int32([0])
    return response


def make_step(step_groups: list[Group], *, now: float = 0.0, **overrides: object) -> Step:
    settings: dict[str, object] = {
        "min_model_revision": 0,
        "step_id": "s",
        "limits": RequestLimits(0, 0),
        "tokens_per_second": 100.0,
        "request_seconds": 2.0,
        "deadline": None,
        "timeout": None,
        "policy": RetryPolicy(),
        "now": now,
        **overrides,
    }
    return Step(step_groups, ("group_mean",), {}, **settings)  # type: ignore[arg-type]


def test_requests_carry_a_few_seconds_of_work_and_a_timeout_from_their_size() -> None:
    step = make_step(groups(10))  # 1000 tokens at 100 tokens/s, 2 s a request
    assert step.requests == 5
    attempt = step.next_attempt(0.0)
    assert attempt is not None and len(attempt.request.groups) == 2
    work = 200 / 100.0
    assert attempt.timeout == pytest.approx(
        REQUEST_TIMEOUT_FLOOR_S + REQUEST_TIMEOUT_WORK_FACTOR * work
    )
    # A split step sends the whole step's reward statistics with every request.
    stats = attempt.request.step_rewards
    assert (stats.count, stats.mean) == (20, 0.5)
    assert stats.sum_squared_deviations == pytest.approx(5.0)


def test_a_refusal_is_retried_after_the_servers_retry_after_until_the_deadline() -> None:
    step = make_step(groups(2), deadline=100.0)
    attempt = step.next_attempt(0.0)
    assert attempt is not None
    for t in range(5):  # far more refusals than any fixed retry count
        step.failed(attempt, Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, 7.5), float(t * 10))
        assert step.next_attempt(t * 10 + 7.0) is None  # not before the Retry-After
        assert step.wait_time(t * 10 + 7.0) == pytest.approx(0.5)
        attempt = step.next_attempt(t * 10 + 7.5)
        assert attempt is not None
    step.succeeded(attempt, answer(attempt.request), 60.0)
    assert step.finished
    result = step.outcome()
    assert [g.group_id for g in result.groups] == ["g0", "g1"]


def test_a_refusal_that_would_outlast_the_deadline_fails_the_step() -> None:
    step = make_step(groups(4), deadline=10.0)
    first = step.next_attempt(0.0)
    second = step.next_attempt(0.0)
    assert first is not None and second is not None
    step.succeeded(first, answer(first.request), 1.0)
    step.failed(second, Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, 20.0), 2.0)
    assert step.next_attempt(2.0) is None
    assert step.finished
    with pytest.raises(StepFailed) as failed:
        step.outcome()
    error = failed.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The finished half is kept, the rest named.
    assert sorted(error.finished) == [0, 1]
    assert error.unfinished == [2, 3]
    assert error.failed_groups == ["g2", "g3"]
    assert [g.group_id for g in error.unfinished_groups] == ["g2", "g3"]


def test_a_resumed_step_sends_only_what_is_missing() -> None:
    step_groups = groups(4)
    step = make_step(step_groups)
    first = step.next_attempt(0.0)
    second = step.next_attempt(0.0)
    assert first is not None and second is not None
    step.succeeded(first, answer(first.request), 1.0)
    step.failed(second, Refusal(grpc.StatusCode.INVALID_ARGUMENT), 1.0)
    with pytest.raises(StepFailed) as failed:
        step.outcome()
    resumed = make_step(step_groups, step_id=None, resume=failed.value)
    assert resumed.step_id == "s"
    sent = []
    while (attempt := resumed.next_attempt(2.0)) is not None:
        sent.extend(g.group_id for g in attempt.request.groups)
        resumed.succeeded(attempt, answer(attempt.request), 3.0)
    assert sent == ["g2", "g3"]
    result = resumed.outcome()
    values = [float(g.rollouts[0].values["group_mean"][0]) for g in result.groups]
    assert values == [0.0, 1.0, 2.0, 3.0]


def test_resuming_other_groups_is_refused() -> None:
    step = make_step(groups(2), request_seconds=1.0)
    attempt = step.next_attempt(0.0)
    assert attempt is not None
    step.failed(attempt, Refusal(grpc.StatusCode.INVALID_ARGUMENT), 0.0)
    while (attempt := step.next_attempt(0.0)) is not None:
        step.succeeded(attempt, answer(attempt.request), 0.0)
    with pytest.raises(StepFailed) as failed:
        step.outcome()
    with pytest.raises(ValueError, match="other groups"):
        make_step(groups(3), resume=failed.value)


def test_a_request_past_its_own_timeout_goes_again_with_more_time() -> None:
    step = make_step(groups(1))
    attempt = step.next_attempt(0.0)
    assert attempt is not None and attempt.timeout is not None
    first_timeout = attempt.timeout
    step.failed(attempt, Refusal(grpc.StatusCode.DEADLINE_EXCEEDED), first_timeout)
    again = step.next_attempt(first_timeout)
    assert again is not None and again.timeout == pytest.approx(2 * first_timeout)


def test_timeouts_never_outlast_the_steps_deadline() -> None:
    step = make_step(groups(1), deadline=30.0)
    attempt = step.next_attempt(10.0)
    assert attempt is not None and attempt.timeout == pytest.approx(20.0)
    step.failed(attempt, Refusal(grpc.StatusCode.DEADLINE_EXCEEDED), 30.0)
    with pytest.raises(StepFailed, match="the step's deadline passed") as failed:
        step.outcome()
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_unavailable_is_given_up_after_a_silence_of_unavailable_wait_s() -> None:
    step = make_step(groups(1), policy=RetryPolicy(unavailable_wait_s=5.0, backoff=0.01))
    t = 0.0
    while (attempt := step.next_attempt(t)) is not None:
        step.failed(attempt, Refusal(grpc.StatusCode.UNAVAILABLE), t)
        t += 1.0
    assert 5.0 <= t <= 7.0
    with pytest.raises(grpc.RpcError) as failed:
        step.outcome()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_no_retries_means_none() -> None:
    step = make_step(groups(1), policy=RetryPolicy(retries=0))
    attempt = step.next_attempt(0.0)
    assert attempt is not None
    step.failed(attempt, Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, 1.0), 0.0)
    assert step.next_attempt(5.0) is None and step.finished


def test_progress_counts_tokens_and_estimates_the_time_left() -> None:
    seen = []
    step = make_step(groups(4), request_seconds=1.0, progress=seen.append)
    attempt = step.next_attempt(0.0)
    assert attempt is not None
    step.succeeded(attempt, answer(attempt.request), 2.0)
    (progress,) = seen
    assert (progress.tokens_done, progress.tokens_total) == (100, 400)
    assert progress.eta_s == pytest.approx(6.0)


def test_an_address_that_speaks_no_grpc_is_not_retried() -> None:
    # What gRPC reports when the target is an HTTP/1.1 port (the server's HTTP API).
    step = make_step(groups(1))
    attempt = step.next_attempt(0.0)
    assert attempt is not None
    details = "ipv4:127.0.0.1:8000: Failed parsing HTTP/2 (Expected SETTINGS frame)"
    step.failed(attempt, Refusal(grpc.StatusCode.UNAVAILABLE, details=details), 0.0)
    assert step.finished and step.next_attempt(0.1) is None


def test_a_content_step_id_follows_the_content() -> None:
    first, second = groups(3), groups(3)
    assert content_step_id(first) == content_step_id(second)
    second[1].rollouts[0] = Rollout(second[1].rollouts[0].response_ids, 0.5)
    assert content_step_id(first) != content_step_id(second)
