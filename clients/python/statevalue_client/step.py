"""One training step as a series of requests, with no I/O of its own.

Everything both clients decide lives here: how a step is cut into requests of a few
seconds of server work, how long each may take, which errors are retried and when, what
is kept of a step that fails and how a resumed step sends only what is missing, and the
merged result. A client shell (blocking or asyncio) asks :meth:`Step.next_attempt` for
work to send, reports each answer with :meth:`Step.succeeded` or :meth:`Step.failed`, and
sleeps as long as :meth:`Step.wait_time` says.

Time belongs to the step: it has one deadline (none by default: it waits as long as the
service makes progress), and each request's timeout is derived from its size and the
throughput the server advertises. Refusals that counted nothing (RESOURCE_EXHAUSTED,
UNAVAILABLE, CANCELLED) are retried after the server's Retry-After until the step's
deadline; a request whose own timeout passed is sent again with a longer one.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from statevalue_client.chunking import (
    RequestLimits,
    StepProgress,
    check_unique_ids,
    group_name,
    name_list,
    plan_requests,
)
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.wire import (
    EstimateResult,
    Group,
    GroupResult,
    ModelInfo,
    build_request,
    group_tokens,
    parse_response,
    step_rewards,
)

# Refusals that counted nothing, so sending again is safe: a full queue, a replica down,
# restarting or draining, and CANCELLED (these clients cancel only calls they abandon, so
# a CANCELLED comes from a replica's server shutting down while the call was in transport).
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)
# How long a step (or a single call) keeps retrying while the service shows no sign of
# life (no answer, no refusal from a live server): long enough for a replica to restart
# and load a small model.
DEFAULT_UNAVAILABLE_WAIT_S = 60.0
# Longest pause between two attempts without a Retry-After: a replica that comes back is
# found within it.
MAX_BACKOFF_S = 2.0
# Server work per request the client aims at: long enough that per-request overhead is
# small, short enough that progress, cancellation and load balancing are fine-grained.
DEFAULT_REQUEST_SECONDS = 4.0
# Request size when the server has not measured its throughput yet.
UNMEASURED_REQUEST_TOKENS = 4096
# A request's timeout: this floor (queueing behind other callers' work, which the server
# bounds by its admission limit) plus this multiple of its own work at the advertised rate.
REQUEST_TIMEOUT_FLOOR_S = 60.0
REQUEST_TIMEOUT_WORK_FACTOR = 4.0
# Without a throughput to reckon from.
UNMEASURED_REQUEST_TIMEOUT_S = 600.0
# A request whose own timeout passed is sent again with a doubled timeout, this many times.
MAX_TIMEOUT_RETRIES = 3
_RETRY_AFTER = "retry-after"
_DEADLINE_PASSED = "the step's deadline passed"

ProgressCallback = Callable[[StepProgress], None]


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"


def error_code(exc: BaseException) -> grpc.StatusCode:
    return exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After (seconds) of a refusal, from the call's trailing metadata."""
    trailing = getattr(exc, "trailing_metadata", None)
    try:
        metadata = trailing() if callable(trailing) else None
    except Exception:  # a call that never reached a server has none
        return None
    for key, value in metadata or ():
        if key == _RETRY_AFTER:
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def speaks_no_grpc(exc: BaseException) -> bool:
    """The address answered, but not in HTTP/2 (e.g. the HTTP port): retrying cannot help."""
    if error_code(exc) != grpc.StatusCode.UNAVAILABLE:
        return False
    details = str(exc.details() if isinstance(exc, grpc.RpcError) else exc)  # type: ignore[attr-defined]
    return "Failed parsing HTTP/2" in details or "http1.x server" in details


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is sent again.

    Args:
        retries: attempts after the first, per request; None (the default) retries the
            refusals of ``retry_codes`` until the step's deadline, and 0 never retries.
            Past a number of retries, UNAVAILABLE still is retried while the service was
            heard from within ``unavailable_wait_s`` (a replica restarting).
        backoff: first back-off in seconds without a Retry-After; doubles per attempt,
            jittered, at most 2 s.
        unavailable_wait_s: give up on UNAVAILABLE and CANCELLED after this long without a
            sign of life from the service (an answer, or a refusal from a live server).
        retry_codes: the codes retried.
    """

    retries: int | None = None
    backoff: float = 0.2
    unavailable_wait_s: float = DEFAULT_UNAVAILABLE_WAIT_S
    retry_codes: tuple[grpc.StatusCode, ...] = RETRY_CODES

    def delay(
        self, exc: BaseException, attempt: int, heard_from: float, now: float
    ) -> float | None:
        """Seconds to wait before sending again after ``exc`` on attempt ``attempt`` (0 is
        the first), or None to give up. ``heard_from``: when the service last showed life."""
        code = error_code(exc)
        if code not in self.retry_codes or self.retries == 0 or speaks_no_grpc(exc):
            return None
        silent = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        if silent and now - heard_from > self.unavailable_wait_s:
            return None
        if self.retries is not None and attempt >= self.retries:
            if code != grpc.StatusCode.UNAVAILABLE:
                return None
        hint = retry_after(exc)
        if hint is not None:
            return hint
        return min(self.backoff * (2**attempt) * (0.5 + random.random()), MAX_BACKOFF_S)


class StepFailed(grpc.RpcError):
    """A step did not finish: what finished is kept, and the same call resumes it.

    It is a ``grpc.RpcError`` whose ``code()`` is the first failure's (DEADLINE_EXCEEDED
    when the step's own deadline passed). Pass it as ``estimate(..., resume=exc)``, or call
    ``estimate`` again with the same ``step_id`` on the same client, to send only the
    unfinished groups; Numca counts no group twice (the requests keep their idempotency
    keys).

    Attributes:
        step_id: the step's id.
        finished: the result of every finished group, by its position in the step.
        unfinished: positions of the groups with no result.
        failed_groups: names (id, or ``groups[i]``) of the groups whose request failed.
        unsent_groups: names of the groups not sent because the step stopped.
        errors: the error of each failed request.
        models: the models that answered the finished groups.
    """

    def __init__(
        self,
        step_id: str,
        *,
        groups: Sequence[Group],
        finished: dict[int, GroupResult],
        failed_groups: list[str],
        unsent_groups: list[str],
        errors: list[BaseException],
        reason: str,
        code: grpc.StatusCode,
        models: list[ModelInfo],
    ) -> None:
        message = f"step {step_id}: {reason}"
        if failed_groups:
            message += f"; failed: {name_list(failed_groups)}"
        if unsent_groups:
            message += f"; not sent: {name_list(unsent_groups)}"
        message += (
            f"; {len(finished)} of {len(groups)} groups finished and kept "
            "(estimate(..., resume=this error) sends the rest)"
        )
        super().__init__(message)
        self.step_id = step_id
        self.groups = list(groups)
        self.finished = finished
        self.unfinished = [i for i in range(len(groups)) if i not in finished]
        self.failed_groups = failed_groups
        self.unsent_groups = unsent_groups
        self.errors = errors
        self.models = models
        self._code = code

    @property
    def unfinished_groups(self) -> list[Group]:
        """The groups still to send, in step order."""
        return [self.groups[i] for i in self.unfinished]

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self)


@dataclass
class Attempt:
    """One request of a step to send now, with its timeout in seconds (``at_deadline``:
    the timeout is what is left of the step's deadline)."""

    index: int
    request: pb.EstimateRequest
    timeout: float | None
    at_deadline: bool = False


@dataclass
class _Request:
    positions: list[int]
    tokens: int
    message: pb.EstimateRequest
    attempts: int = 0
    timeouts: int = 0
    not_before: float = 0.0


def _fingerprint(group: Group) -> tuple[Any, ...]:
    return (
        group.group_id,
        len(group.prompt_ids),
        tuple(len(r.response_ids) for r in group.rollouts),
    )


class Step:
    """One ``estimate()`` call: its requests, their retries, progress and the merged result.

    Args:
        groups: the step's groups.
        methods, params, min_model_revision: as for ``estimate()``.
        step_id: shared by every request (default: a fresh random id).
        limits: the server's per-request limits.
        tokens_per_second: the throughput the server advertises (0: not measured yet).
        request_seconds: server work per request to aim at.
        deadline: monotonic time by which the step gives up (None: never).
        timeout: a fixed per-request timeout instead of the derived one.
        policy: the retry policy.
        now: the monotonic time the step starts.
        resume: a :class:`StepFailed` of the same groups whose finished groups are kept.
        progress, progress_bar: a callback after each request; a tqdm bar of tokens.
    """

    def __init__(
        self,
        groups: Iterable[Group],
        methods: Sequence[str],
        params: Mapping[str, Mapping[str, Any]],
        *,
        min_model_revision: int,
        step_id: str | None,
        limits: RequestLimits,
        tokens_per_second: float,
        request_seconds: float,
        deadline: float | None,
        timeout: float | None,
        policy: RetryPolicy,
        now: float,
        resume: StepFailed | None = None,
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
    ) -> None:
        groups = list(groups)
        if resume is not None:
            if step_id is not None and step_id != resume.step_id:
                raise ValueError(f"resume is step {resume.step_id!r}, not {step_id!r}")
            if [_fingerprint(g) for g in groups] != [_fingerprint(g) for g in resume.groups]:
                raise ValueError(
                    f"resume: step {resume.step_id!r} was begun with other groups "
                    "(ids or token counts differ)"
                )
            step_id = resume.step_id
        self.step_id = step_id or uuid.uuid4().hex
        # A group Numca keeps (prompt_id) with no key of its own is keyed by this step, so
        # retries and a resumed step never count it twice.
        self.groups = [
            dataclasses.replace(group, idempotency_key=f"{self.step_id}/{i}")
            if group.prompt_id and not (group.group_id or group.idempotency_key)
            else group
            for i, group in enumerate(groups)
        ]
        ids = [group.group_id for group in self.groups]
        check_unique_ids(ids)
        tokens = [group_tokens(group) for group in self.groups]
        self._finished: dict[int, GroupResult] = dict(resume.finished) if resume else {}
        self._models: list[ModelInfo] = list(resume.models) if resume else []
        todo = [i for i in range(len(self.groups)) if i not in self._finished]
        target = (
            int(request_seconds * tokens_per_second)
            if tokens_per_second > 0
            else UNMEASURED_REQUEST_TOKENS
        )
        plan = plan_requests(
            [tokens[i] for i in todo],
            [self.groups[i].prompt_id for i in todo],
            [ids[i] for i in todo],
            limits,
            target_tokens=max(1, target),
        )
        if not plan and not self._finished:
            plan = [[]]  # no groups: one empty request, so the server says what is wrong
        # Split or not, every request scales "batch" advantages by the whole step's rewards.
        rewards = step_rewards(self.groups) if len(plan) > 1 or self._finished else None
        self._requests: list[_Request] = []
        for indices in plan:
            positions = [todo[i] for i in indices]
            message = build_request(
                [self.groups[p] for p in positions],
                methods,
                params,
                min_model_revision,
                self.step_id,
            )
            if rewards is not None:
                message.step_rewards.CopyFrom(rewards)
            self._requests.append(_Request(positions, sum(tokens[p] for p in positions), message))
        self._pending: list[int] = list(range(len(self._requests)))
        self._in_flight: set[int] = set()
        self._errors: dict[int, BaseException] = {}
        self._stop_reason: str | None = None
        self._deadline = deadline
        self._timeout = timeout
        self._tokens_per_second = tokens_per_second
        self._policy = policy
        self._started = now
        self._heard_from = now
        self._tokens_total = sum(tokens)
        self._tokens_before = sum(tokens[i] for i in self._finished)
        self._tokens_done = self._tokens_before
        self._forward_seconds = 0.0
        self._estimator_seconds = 0.0
        self._progress = progress
        self._bar = None
        if progress_bar:
            try:
                from tqdm.auto import tqdm
            except ImportError as exc:
                raise ImportError(
                    'progress_bar=True needs tqdm: pip install "statevalue-client[progress]"'
                ) from exc
            self._bar = tqdm(
                total=self._tokens_total,
                initial=self._tokens_done,
                unit="tok",
                unit_scale=True,
                desc="statevalue step",
            )

    @property
    def requests(self) -> int:
        """How many requests the step's unfinished groups were cut into."""
        return len(self._requests)

    def next_attempt(self, now: float) -> Attempt | None:
        """The next request to send now, oldest first; None if none is due."""
        self._check_deadline(now)
        if self._stop_reason is not None:
            return None
        for index in self._pending:
            request = self._requests[index]
            if request.not_before <= now:
                self._pending.remove(index)
                self._in_flight.add(index)
                timeout = self._request_timeout(request, now)
                at_deadline = self._deadline is not None and timeout == max(
                    0.001, self._deadline - now
                )
                return Attempt(index, request.message, timeout, at_deadline)
        return None

    def wait_time(self, now: float) -> float | None:
        """Seconds until a request is due to be sent; None if no more will be."""
        self._check_deadline(now)
        if self._stop_reason is not None or not self._pending:
            return None
        due = min(self._requests[i].not_before for i in self._pending)
        wait = max(0.0, due - now)
        if self._deadline is not None:
            wait = min(wait, max(0.0, self._deadline - now))
        return wait

    @property
    def finished(self) -> bool:
        """Nothing in flight and nothing more to send."""
        return not self._in_flight and (self._stop_reason is not None or not self._pending)

    def succeeded(self, attempt: Attempt, response: pb.EstimateResponse, now: float) -> None:
        request = self._requests[attempt.index]
        self._in_flight.discard(attempt.index)
        self._heard_from = now
        result = parse_response(response)
        if result.model not in self._models:
            self._models.append(result.model)
        for position, group in zip(request.positions, result.groups, strict=True):
            group_id = self.groups[position].group_id or group_name("", position)
            self._finished[position] = dataclasses.replace(group, group_id=group_id)
        self._forward_seconds += result.forward_seconds
        self._estimator_seconds += result.estimator_seconds
        self._tokens_done += request.tokens
        if self._bar is not None:
            self._bar.update(request.tokens)
        if self._progress is not None:
            self._progress(self._progress_now(now))

    def failed(self, attempt: Attempt, exc: BaseException, now: float) -> None:
        """Schedule the request again, or record the failure and stop sending more."""
        request = self._requests[attempt.index]
        self._in_flight.discard(attempt.index)
        code = error_code(exc)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            self._heard_from = now  # a live server refused: the service is there
        delay: float | None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and self._timeout is None:
            # The request's derived timeout passed (the server dropped its work): the
            # server is slower than it said, so the request goes again with more time.
            request.timeouts += 1
            delay = 0.0 if request.timeouts <= MAX_TIMEOUT_RETRIES else None
        else:
            delay = self._policy.delay(exc, request.attempts, self._heard_from, now)
            request.attempts += 1
        if delay is not None and (self._deadline is None or now + delay < self._deadline):
            request.not_before = now + delay
            # Back in step order: the oldest work goes first, as the server queues it.
            self._pending.append(attempt.index)
            self._pending.sort()
            return
        self._errors[attempt.index] = exc
        if self._stop_reason is None:
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and attempt.at_deadline:
                self._stop_reason = _DEADLINE_PASSED
            else:
                self._stop_reason = f"a request failed ({describe_error(exc)})"

    def outcome(self) -> EstimateResult:
        """The merged result in the order of the groups; raises :class:`StepFailed`."""
        if self._bar is not None:
            self._bar.close()
        if len(self._finished) < len(self.groups) or self._errors:
            alone = len(self._requests) == 1 and not self._finished
            if alone and self._errors and self._stop_reason != _DEADLINE_PASSED:
                raise self._errors[0]  # the whole call was this one request: its own error
            errors = [self._errors[i] for i in sorted(self._errors)]
            code = error_code(errors[0]) if errors else grpc.StatusCode.DEADLINE_EXCEEDED
            raise StepFailed(
                self.step_id,
                groups=self.groups,
                finished=dict(self._finished),
                failed_groups=self._names(sorted(self._errors)),
                unsent_groups=self._names(
                    i
                    for i, request in enumerate(self._requests)
                    if i not in self._errors
                    and not all(p in self._finished for p in request.positions)
                ),
                errors=errors,
                reason=self._stop_reason or "stopped",
                code=code,
                models=list(self._models),
            )
        return EstimateResult(
            model=self._models[0],
            groups=[self._finished[i] for i in range(len(self.groups))],
            forward_seconds=self._forward_seconds,
            estimator_seconds=self._estimator_seconds,
            models=list(self._models),
            step_id=self.step_id,
        )

    def _request_timeout(self, request: _Request, now: float) -> float | None:
        timeout = self._timeout
        if timeout is None:
            if self._tokens_per_second > 0:
                work = request.tokens / self._tokens_per_second
                timeout = REQUEST_TIMEOUT_FLOOR_S + REQUEST_TIMEOUT_WORK_FACTOR * work
            else:
                timeout = UNMEASURED_REQUEST_TIMEOUT_S
            timeout *= 2**request.timeouts
        if self._deadline is not None:
            timeout = min(timeout, max(0.001, self._deadline - now))
        return timeout

    def _check_deadline(self, now: float) -> None:
        if (
            self._stop_reason is None
            and self._deadline is not None
            and now >= self._deadline
            and self._pending
        ):
            self._stop_reason = _DEADLINE_PASSED

    def _progress_now(self, now: float) -> StepProgress:
        elapsed = now - self._started
        done = self._tokens_done - self._tokens_before
        left = self._tokens_total - self._tokens_done
        eta = left * elapsed / done if done > 0 and elapsed > 0 else None
        finished = [
            i for i, r in enumerate(self._requests) if all(p in self._finished for p in r.positions)
        ]
        return StepProgress(
            requests_done=len(finished),
            requests_total=len(self._requests),
            groups_done=len(self._finished),
            groups_total=len(self.groups),
            tokens_done=self._tokens_done,
            tokens_total=self._tokens_total,
            elapsed_s=elapsed,
            eta_s=eta,
        )

    def _names(self, requests: Iterable[int]) -> list[str]:
        groups = self.groups
        return [
            group_name(groups[p].group_id, p) for r in requests for p in self._requests[r].positions
        ]
