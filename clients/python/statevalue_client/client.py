"""Blocking and asyncio clients of the statevalue gRPC service."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np

from statevalue_client.arrays import FLOAT32, INT32, pack_float32, pack_int32, unpack
from statevalue_client.chunking import (
    RequestLimits,
    StepProgress,
    check_unique_ids,
    group_name,
    name_list,
    plan_requests,
)
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.states import GroupStates, add_states_to_request
from statevalue_client.targets import is_multi_address, replica_addresses

if TYPE_CHECKING:
    # The weight updates need torch, which only trainers have; the rest of the client not.
    import torch

    from statevalue_client.weights import WeightSender

DEFAULT_METHODS = ("numca", "hista", "group_mean")
# A full queue (RESOURCE_EXHAUSTED) has counted nothing, so sending again is safe.
# CANCELLED too: this client never cancels a call it waits for, so a CANCELLED comes from
# a replica's gRPC server shutting down while the call was in transport.
RETRY_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)
# How long UNAVAILABLE keeps being retried: long enough for a replica to restart and load
# a small model.
DEFAULT_UNAVAILABLE_WAIT_S = 60.0
DEFAULT_MAX_IN_FLIGHT = 4
# The server's default advantage.scale_eps (tests/test_client_chunking.py keeps them equal).
DEFAULT_SCALE_EPS = 1e-4
_T = TypeVar("_T")
ProgressCallback = Callable[[StepProgress], None]


@dataclass
class Rollout:
    """One response as token ids; no reward makes it a query (values only, no statistics)."""

    response_ids: np.ndarray | Sequence[int]
    reward: float | None = None
    token_rewards: np.ndarray | Sequence[float] | None = None


@dataclass
class Group:
    """One prompt and its sampled rollouts. ``prompt_id`` lets Numca accumulate across steps.

    Numca counts a group with a ``prompt_id`` once per ``idempotency_key`` (default: its
    ``group_id``; without either, ``estimate()`` keys it by step id and position, so its
    own retries never count twice).
    """

    prompt_ids: np.ndarray | Sequence[int]
    rollouts: list[Rollout]
    group_id: str = ""
    prompt_id: str = ""
    idempotency_key: str = ""
    # Hista's representations from the trainer's own hidden states (statevalue_client.states).
    hista_states: GroupStates | None = None


@dataclass
class RolloutResult:
    """Per method name: float32 values and advantages (one per token) and int32 boundaries."""

    values: dict[str, np.ndarray]
    advantages: dict[str, np.ndarray]
    boundaries: dict[str, np.ndarray]


@dataclass
class GroupResult:
    group_id: str
    rollouts: list[RolloutResult]


@dataclass
class ModelInfo:
    """The served model; ``max_request_*`` are the server's per-request limits (0: none).

    ``default_params`` (from ``model_info()``): the estimator parameters the server's params
    file sets, e.g. ``{"hista": {"node_spacing": 10}}``; they fill what a request leaves
    unset, and every other field is the server's built-in default.
    """

    name: str
    version: str
    vocab_size: int = 0
    max_length: int = 0
    hidden_size: int = 0
    device: str = ""
    revision: int = 0
    max_request_tokens: int = 0
    max_request_groups: int = 0
    default_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend: str = ""
    forward_path: str = ""
    tokens_per_second: float = 0.0


@dataclass
class EstimateResult:
    """Results in the order of the groups sent.

    ``model`` names the weights of the first request; ``models`` lists every distinct
    model that answered part of the step (more than one only if weights changed mid-step).
    ``forward_seconds`` and ``estimator_seconds`` are summed over the step's requests.
    """

    model: ModelInfo
    groups: list[GroupResult]
    forward_seconds: float = 0.0
    estimator_seconds: float = 0.0
    models: list[ModelInfo] = field(default_factory=list)
    step_id: str = ""


class StepFailed(grpc.RpcError):
    """Some requests of a split step failed after their retries; no partial result is
    returned. (A call sent as one request raises that request's error unchanged.)

    It is a ``grpc.RpcError`` whose ``code()`` and ``details()`` are the first failure's.

    Attributes:
        failed_groups: names (id, or ``groups[i]``) of the groups whose request failed.
        unsent_groups: groups not sent because the step stopped at the first failure.
        errors: the error of each failed request.
    """

    def __init__(
        self,
        step_id: str,
        failed_groups: list[str],
        unsent_groups: list[str],
        errors: list[BaseException],
    ) -> None:
        message = (
            f"step {step_id}: {len(errors)} request(s) failed after retries, groups "
            f"{name_list(failed_groups)} ({_describe(errors[0])})"
        )
        if unsent_groups:
            message += f"; not sent after the failure: {name_list(unsent_groups)}"
        super().__init__(message)
        self.step_id = step_id
        self.failed_groups = failed_groups
        self.unsent_groups = unsent_groups
        self.errors = errors

    def code(self) -> grpc.StatusCode:
        return _code(self.errors[0])

    def details(self) -> str:
        return str(self)


@dataclass
class ReloadResult:
    """The model of every replica after a reload; ``revision`` is the lowest of them."""

    replicas: dict[str, ModelInfo]

    @property
    def name(self) -> str:
        return next(iter(self.replicas.values())).name

    @property
    def version(self) -> str:
        return next(iter(self.replicas.values())).version

    @property
    def revision(self) -> int:
        return min(info.revision for info in self.replicas.values())


class ReloadFailed(grpc.RpcError):
    """The reload failed on some replicas; ``reloaded`` holds the ones where it worked.

    It is a ``grpc.RpcError`` whose ``code()`` is the first failure's.
    """

    def __init__(self, errors: dict[str, BaseException], reloaded: dict[str, ModelInfo]) -> None:
        failed = "; ".join(f"{address}: {_describe(exc)}" for address, exc in errors.items())
        super().__init__(
            f"reload failed on {len(errors)} of {len(errors) + len(reloaded)} replicas: {failed}"
        )
        self.errors = errors
        self.reloaded = reloaded

    def code(self) -> grpc.StatusCode:
        return _code(next(iter(self.errors.values())))

    def details(self) -> str:
        return str(self)


def _code(exc: BaseException) -> grpc.StatusCode:
    return exc.code() if isinstance(exc, grpc.RpcError) else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError):
        return f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
    return f"{type(exc).__name__}: {exc}"


def channel_options(max_message_bytes: int, target: str) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if is_multi_address(target):
        # Spread calls over every address of the target (one per replica); gRPC's default
        # (pick_first) would send everything to the first address that answers.
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def _replica_channel(
    module: Any,
    address: str,
    target: str,
    max_message_bytes: int,
    credentials: grpc.ChannelCredentials | None,
) -> Any:
    """A channel to one replica behind ``target`` (``module`` is grpc or grpc.aio).

    Over TLS the certificate is checked against the target's host name, not the
    replica's address.
    """
    options = channel_options(max_message_bytes, address)
    if credentials is None:
        return module.insecure_channel(address, options=options)
    host = target.split("///", 1)[-1].rsplit(":", 1)[0].strip("[]")
    options.append(("grpc.ssl_target_name_override", host))
    return module.secure_channel(address, credentials, options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata of ``token``; none without one."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


def build_request(
    groups: Iterable[Group],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    min_model_revision: int = 0,
    step_id: str = "",
) -> pb.EstimateRequest:
    """The protobuf request for ``groups``; ``params`` maps numca/hista/advantage to fields."""
    groups = list(groups)
    request = pb.EstimateRequest(
        methods=list(methods), min_model_revision=min_model_revision, step_id=step_id
    )
    for section, values in params.items():
        if section not in ("numca", "hista", "advantage"):
            raise ValueError(f"unknown parameter section {section!r}: numca, hista or advantage")
        target = getattr(request.params, section)
        for name, value in values.items():
            if name not in target.DESCRIPTOR.fields_by_name:
                raise ValueError(f"unknown parameter {section}.{name}")
            setattr(target, name, value)
    for group in groups:
        message = request.groups.add(
            group_id=group.group_id,
            prompt_id=group.prompt_id,
            idempotency_key=group.idempotency_key,
            prompt_ids=pack_int32(group.prompt_ids),
            prompt_num_tokens=len(group.prompt_ids),
        )
        for rollout in group.rollouts:
            item = message.rollouts.add(
                response_ids=pack_int32(rollout.response_ids),
                num_tokens=len(rollout.response_ids),
            )
            if rollout.reward is not None:
                item.reward = float(rollout.reward)
            if rollout.token_rewards is not None:
                item.token_rewards = pack_float32(rollout.token_rewards)
    add_states_to_request(request, groups)
    return request


def reload_request(
    checkpoint: str, version: str, admin_token: str
) -> tuple[pb.ReloadWeightsRequest, tuple[tuple[str, str], ...]]:
    """The ReloadWeights message and its bearer-token metadata."""
    request = pb.ReloadWeightsRequest(checkpoint=checkpoint, version=version)
    return request, auth_metadata(admin_token)


def parse_model(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name,
        version=info.version,
        vocab_size=info.vocab_size,
        max_length=info.max_length,
        hidden_size=info.hidden_size,
        device=info.device,
        revision=info.revision,
        max_request_tokens=info.max_request_tokens,
        max_request_groups=info.max_request_groups,
        backend=info.backend,
        forward_path=info.forward_path,
        tokens_per_second=info.tokens_per_second,
        default_params={
            section.name: {f.name: value for f, value in message.ListFields()}
            for section, message in info.default_params.ListFields()
        },
    )


def parse_response(response: pb.EstimateResponse) -> EstimateResult:
    """Numpy views of the packed arrays of a response."""
    groups = []
    for group in response.groups:
        rollouts = []
        for rollout in group.rollouts:
            n = rollout.num_tokens
            methods = rollout.methods
            rollouts.append(
                RolloutResult(
                    values={m: unpack(o.values, FLOAT32, n, "values") for m, o in methods.items()},
                    advantages={
                        m: unpack(o.advantages, FLOAT32, n, "advantages")
                        for m, o in methods.items()
                    },
                    boundaries={m: unpack(o.boundaries, INT32) for m, o in methods.items()},
                )
            )
        groups.append(GroupResult(group_id=group.group_id, rollouts=rollouts))
    return EstimateResult(
        model=parse_model(response.model),
        groups=groups,
        forward_seconds=response.forward_seconds,
        estimator_seconds=response.estimator_seconds,
    )


# Longest pause between two attempts: a replica that comes back is found within it.
MAX_BACKOFF_S = 2.0


def _retry_delay(
    code: grpc.StatusCode,
    attempt: int,
    started: float,
    *,
    retries: int,
    backoff: float,
    retry_codes: tuple[grpc.StatusCode, ...],
    unavailable_wait_s: float,
) -> float | None:
    """Seconds to wait before attempt ``attempt + 1``, or None to give up.

    ``retries`` attempts follow the first for any of ``retry_codes``; past them, an
    UNAVAILABLE (a replica restarting, loading its model or draining) is retried until
    ``unavailable_wait_s`` have passed since ``started``. ``retries`` = 0 never retries.
    """
    if code not in retry_codes or retries == 0:
        return None
    delay = min(backoff * (2**attempt) * (0.5 + random.random()), MAX_BACKOFF_S)
    if attempt < retries:
        return delay
    if code == grpc.StatusCode.UNAVAILABLE:
        if time.monotonic() + delay - started <= unavailable_wait_s:
            return delay
    return None


def _group_tokens(group: Group) -> int:
    """Prompt+response tokens of every rollout: the server's measure of a request's work."""
    prompt = len(group.prompt_ids)
    return sum(prompt + len(rollout.response_ids) for rollout in group.rollouts)


class _Step:
    """One ``estimate()`` call: its requests, their answers, progress and the merged result."""

    def __init__(
        self,
        groups: Iterable[Group],
        methods: Sequence[str],
        params: Mapping[str, Mapping[str, Any]],
        min_model_revision: int,
        step_id: str | None,
        limits: RequestLimits,
        progress: ProgressCallback | None,
        progress_bar: bool,
    ) -> None:
        self.step_id = step_id or uuid.uuid4().hex
        # A group Numca keeps (prompt_id) with no key of its own is keyed by this step, so
        # the retries below never count it twice.
        self.groups = [
            dataclasses.replace(group, idempotency_key=f"{self.step_id}/{i}")
            if group.prompt_id and not (group.group_id or group.idempotency_key)
            else group
            for i, group in enumerate(groups)
        ]
        ids = [group.group_id for group in self.groups]
        check_unique_ids(ids)
        tokens = [_group_tokens(group) for group in self.groups]
        # No groups: one empty request, so the server says what is wrong with it.
        self.plan = plan_requests(tokens, [g.prompt_id for g in self.groups], ids, limits) or [[]]
        advantage = dict(params.get("advantage", {}))
        self._batch_eps: float | None = None
        if len(self.plan) > 1 and advantage.get("scale") == "batch":
            # Each request would divide by the std of its own rewards; the step's batch is
            # all of them, so the requests send unscaled advantages and the step scales here.
            self._batch_eps = float(advantage.get("scale_eps", DEFAULT_SCALE_EPS))
            params = {**params, "advantage": {**advantage, "scale": "none"}}
        self.requests = [
            build_request(
                [self.groups[i] for i in indices],
                methods,
                params,
                min_model_revision,
                self.step_id,
            )
            for indices in self.plan
        ]
        self._tokens = [sum(tokens[i] for i in indices) for indices in self.plan]
        self._results: dict[int, EstimateResult] = {}
        self._errors: dict[int, BaseException] = {}
        self._progress = progress
        self._bar = None
        if progress_bar:
            try:
                from tqdm.auto import tqdm
            except ImportError as exc:
                raise ImportError(
                    'progress_bar=True needs tqdm: pip install "statevalue-client[progress]"'
                ) from exc
            self._bar = tqdm(total=sum(tokens), unit="tok", desc="statevalue step")

    def done(self, index: int, response: pb.EstimateResponse) -> None:
        self._results[index] = parse_response(response)
        if self._bar is not None:
            self._bar.update(self._tokens[index])
        if self._progress is not None:
            finished = list(self._results)
            self._progress(
                StepProgress(
                    requests_done=len(finished),
                    requests_total=len(self.plan),
                    groups_done=sum(len(self.plan[i]) for i in finished),
                    groups_total=len(self.groups),
                    tokens_done=sum(self._tokens[i] for i in finished),
                    tokens_total=sum(self._tokens),
                )
            )

    def failed(self, index: int, exc: BaseException) -> None:
        self._errors[index] = exc

    @property
    def stopped(self) -> bool:
        """After a failure no more requests are sent: the call fails anyway."""
        return bool(self._errors)

    def outcome(self) -> EstimateResult:
        """The merged result, in the order of the groups; raises StepFailed if any failed."""
        if self._bar is not None:
            self._bar.close()
        if self._errors and len(self.plan) == 1:
            raise self._errors[0]  # the whole call was this one request: its own error
        if self._errors:
            answered = set(self._results) | set(self._errors)
            raise StepFailed(
                self.step_id,
                self._names(i for i in sorted(self._errors)),
                self._names(i for i in range(len(self.plan)) if i not in answered),
                [self._errors[i] for i in sorted(self._errors)],
            )
        merged: list[GroupResult | None] = [None] * len(self.groups)
        models: list[ModelInfo] = []
        for index, indices in enumerate(self.plan):
            result = self._results[index]
            if result.model not in models:
                models.append(result.model)
            for position, group in zip(indices, result.groups, strict=True):
                group_id = self.groups[position].group_id or group_name("", position)
                merged[position] = GroupResult(group_id=group_id, rollouts=group.rollouts)
        if self._batch_eps is not None:
            self._scale_by_batch(merged, self._batch_eps)
        results = self._results.values()
        return EstimateResult(
            model=models[0],
            groups=[group for group in merged if group is not None],
            forward_seconds=sum(r.forward_seconds for r in results),
            estimator_seconds=sum(r.estimator_seconds for r in results),
            models=models,
            step_id=self.step_id,
        )

    def _scale_by_batch(self, merged: Sequence[GroupResult | None], eps: float) -> None:
        """Divide every advantage by the std of the step's rewards + eps, as the server's
        ``scale="batch"`` does over one request."""
        rewards = np.array(
            [r.reward for g in self.groups for r in g.rollouts if r.reward is not None],
            dtype=np.float64,
        )
        scale = (float(rewards.std(ddof=1)) if len(rewards) > 1 else 1.0) + eps
        for group in merged:
            assert group is not None
            for rollout in group.rollouts:
                for method, advantages in rollout.advantages.items():
                    scaled = advantages.astype(np.float64) / scale
                    rollout.advantages[method] = scaled.astype(np.float32)

    def _names(self, requests: Iterable[int]) -> list[str]:
        groups = self.groups
        return [group_name(groups[i].group_id, i) for r in requests for i in self.plan[r]]


def _reload_outcome(
    calls: Mapping[str, Future[ModelInfo] | asyncio.Task[ModelInfo]],
) -> ReloadResult:
    """Every replica's model, or ReloadFailed naming the replicas that did not reload."""
    reloaded: dict[str, ModelInfo] = {}
    errors: dict[str, BaseException] = {}
    for address, call in calls.items():
        error = call.exception()
        if error is None:
            reloaded[address] = call.result()
        else:
            errors[address] = error
    if errors:
        raise ReloadFailed(errors, reloaded)
    return ReloadResult(replicas=reloaded)


class ValueClient:
    """Blocking client.

    Args:
        target: ``host:port``, or ``dns:///name:port`` / ``ipv4:a:port,b:port`` (round-robin
            over every replica).
        timeout: seconds per request (the server drops work whose deadline passed).
        retries: extra attempts on UNAVAILABLE (e.g. a replica restarting or draining),
            RESOURCE_EXHAUSTED (a full queue) and CANCELLED (a replica's gRPC server
            shutting down under the call), with back-off; 0 never retries.
        backoff: first back-off in seconds; doubles per attempt, jittered, at most 2 s.
        unavailable_wait_s: past ``retries``, UNAVAILABLE is retried until this long after
            the first attempt, so a call outlasts a replica's restart (retries > 0 only).
        max_message_bytes: send/receive limit; must not exceed the server's.
        max_in_flight: requests of one ``estimate()`` call sent at once.
        credentials: TLS channel credentials (``grpc.ssl_channel_credentials``) for a
            server started with a certificate; plaintext without.
        api_token: bearer token for a server that requires one on Estimate.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = 256 << 20,
        retry_codes: Sequence[grpc.StatusCode] = RETRY_CODES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        credentials: grpc.ChannelCredentials | None = None,
        api_token: str | None = None,
        unavailable_wait_s: float = DEFAULT_UNAVAILABLE_WAIT_S,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_codes = tuple(retry_codes)
        self.unavailable_wait_s = unavailable_wait_s
        self._retry_policy: dict[str, Any] = {
            "retries": retries,
            "backoff": backoff,
            "retry_codes": self.retry_codes,
            "unavailable_wait_s": unavailable_wait_s,
        }
        self.max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._limits: RequestLimits | None = None
        options = channel_options(max_message_bytes, target)
        self._metadata = auth_metadata(api_token)
        self._channel = (
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )
        self._stub = pb_grpc.ValueServiceStub(self._channel)
        self._weights: WeightSender | None = None

    def _call(self, fn: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return fn(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = _retry_delay(exc.code(), attempt, started, **self._retry_policy)
                if delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        timeout: float | None = None,
        min_model_revision: int = 0,
        step_id: str | None = None,
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups``: any number of them, e.g. a whole step.

        The groups are split into requests under the server's per-request limits (read
        once from :meth:`model_info`), at most ``max_in_flight`` sent at once (over every
        replica of a multi-address target), each with ``timeout`` and its own retries;
        the results come back in the order of ``groups``. Every request carries
        ``step_id`` (default: a fresh random id). ``progress`` is called with a
        :class:`StepProgress` after each request; ``progress_bar`` shows a tqdm bar.

        ``params`` are per-section estimator parameters, e.g.
        ``hista={"d_min": 2.0}, advantage={"scale": "none"}``. ``min_model_revision``
        makes the server refuse (FAILED_PRECONDITION) while its weights are older.

        Raises:
            ValueError: duplicate group ids, or a group alone over the token limit.
            StepFailed: a request of a split step failed after its retries; it names the
                groups. A call sent as one request raises its ``grpc.RpcError`` unchanged.
        """
        step = _Step(
            groups,
            methods,
            params,
            min_model_revision,
            step_id,
            self.request_limits(timeout=timeout),
            progress,
            progress_bar,
        )
        workers = min(self.max_in_flight, len(step.requests))
        with ThreadPoolExecutor(workers, thread_name_prefix="statevalue-step") as pool:
            running: dict[Future[pb.EstimateResponse], int] = {}
            queued = iter(range(len(step.requests)))
            while True:
                while len(running) < workers and not step.stopped:
                    index = next(queued, None)
                    if index is None:
                        break
                    request = step.requests[index]
                    running[pool.submit(self._call, self._stub.Estimate, request, timeout)] = index
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    index = running.pop(future)
                    try:
                        step.done(index, future.result())
                    except Exception as exc:
                        step.failed(index, exc)
        return step.outcome()

    def request_limits(self, *, timeout: float | None = None) -> RequestLimits:
        """The server's per-request limits, asked once and remembered."""
        if self._limits is None:
            info = self.model_info(timeout=timeout)
            self._limits = RequestLimits(info.max_request_tokens, info.max_request_groups)
        return self._limits

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return parse_model(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def reload_weights(
        self,
        checkpoint: str,
        *,
        admin_token: str,
        version: str = "",
        timeout: float | None = None,
    ) -> ReloadResult:
        """Load the checkpoint directory ``checkpoint`` (a path on the servers) as new weights
        on every replica behind the target, at once; returns each replica's model.

        Raises:
            ReloadFailed: some replicas did not reload (it says which, and why).
        """
        request, metadata = reload_request(checkpoint, version, admin_token)
        addresses = replica_addresses(self.target)
        call = functools.partial(self._admin_call, "ReloadWeights", timeout=timeout)
        with ThreadPoolExecutor(len(addresses), thread_name_prefix="statevalue-reload") as pool:
            futures = {
                address: pool.submit(call, address, request, metadata) for address in addresses
            }
        return _reload_outcome(futures)

    def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        admin_token: str,
        version: str = "",
        rendezvous: str | None = None,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        timeout: float | None = None,
    ) -> ReloadResult:
        """Send the trainer's current weights from memory to every replica behind the target.

        ``tensors``: a (gathered) state dict or ``named_parameters()``. The first call opens
        a TCP store at ``rendezvous`` (``host:port`` the replicas reach; default: this
        machine's address towards them, any free port) and a process group with the
        replicas; later calls reuse both. ``backend``: ``"gloo"``, ``"nccl"`` or ``"auto"``
        (NCCL when the tensors are on CUDA). Each replica checks names and shapes before
        any byte moves, receives buckets of at most ``bucket_bytes`` (default 128 MiB)
        into a staged copy and swaps it in between two forward steps
        (docs/integrations.md). Needs torch.

        Raises:
            ReloadFailed: some replicas did not take the new weights (it says which, and
                why); they keep serving their old ones.
        """
        from statevalue_client.weights import open_weight_sender

        sender = self._weights = open_weight_sender(self._weights, rendezvous)
        metadata = auth_metadata(admin_token)
        call = functools.partial(self._admin_call, "UpdateWeights", timeout=timeout)
        addresses = replica_addresses(self.target)
        with ThreadPoolExecutor(len(addresses), thread_name_prefix="statevalue-weights") as pool:
            calls = sender.update(
                tensors,
                addresses=addresses,
                version=version,
                send=lambda address, request: pool.submit(call, address, request, metadata),
                backend=backend,
                bucket_bytes=bucket_bytes,
                timeout=timeout or self.timeout,
            )
        return _reload_outcome(calls)

    def _admin_call(
        self,
        rpc: str,
        address: str,
        request: Any,
        metadata: tuple[tuple[str, str], ...],
        *,
        timeout: float | None,
    ) -> ModelInfo:
        """An admin RPC (ReloadWeights, UpdateWeights) to one replica behind the target."""
        if address == self.target:
            method = getattr(self._stub, rpc)
            return parse_model(method(request, timeout=timeout or self.timeout, metadata=metadata))
        with _replica_channel(
            grpc, address, self.target, self._max_message_bytes, self._credentials
        ) as channel:
            method = getattr(pb_grpc.ValueServiceStub(channel), rpc)
            return parse_model(method(request, timeout=timeout or self.timeout, metadata=metadata))

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
        self._channel.close()

    def __enter__(self) -> ValueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncValueClient:
    """asyncio client with the same arguments and methods as :class:`ValueClient`."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.2,
        max_message_bytes: int = 256 << 20,
        retry_codes: Sequence[grpc.StatusCode] = RETRY_CODES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        credentials: grpc.ChannelCredentials | None = None,
        api_token: str | None = None,
        unavailable_wait_s: float = DEFAULT_UNAVAILABLE_WAIT_S,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_codes = tuple(retry_codes)
        self.unavailable_wait_s = unavailable_wait_s
        self._retry_policy: dict[str, Any] = {
            "retries": retries,
            "backoff": backoff,
            "retry_codes": self.retry_codes,
            "unavailable_wait_s": unavailable_wait_s,
        }
        self.max_in_flight = max_in_flight
        self._max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._limits: RequestLimits | None = None
        options = channel_options(max_message_bytes, target)
        self._metadata = auth_metadata(api_token)
        self._channel = (
            grpc.aio.insecure_channel(target, options=options)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options)
        )
        self._stub = pb_grpc.ValueServiceStub(self._channel)
        self._weights: WeightSender | None = None

    async def _call(self, fn: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return await fn(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                delay = _retry_delay(exc.code(), attempt, started, **self._retry_policy)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        timeout: float | None = None,
        min_model_revision: int = 0,
        step_id: str | None = None,
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups`` (see :meth:`ValueClient.estimate`)."""
        step = _Step(
            groups,
            methods,
            params,
            min_model_revision,
            step_id,
            await self.request_limits(timeout=timeout),
            progress,
            progress_bar,
        )
        workers = min(self.max_in_flight, len(step.requests))
        running: dict[asyncio.Task[pb.EstimateResponse], int] = {}
        queued = iter(range(len(step.requests)))
        try:
            while True:
                while len(running) < workers and not step.stopped:
                    index = next(queued, None)
                    if index is None:
                        break
                    call = self._call(self._stub.Estimate, step.requests[index], timeout)
                    running[asyncio.ensure_future(call)] = index
                if not running:
                    break
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    index = running.pop(task)
                    try:
                        step.done(index, task.result())
                    except Exception as exc:
                        step.failed(index, exc)
        finally:
            for task in running:
                task.cancel()
        return step.outcome()

    async def request_limits(self, *, timeout: float | None = None) -> RequestLimits:
        """The server's per-request limits, asked once and remembered."""
        if self._limits is None:
            info = await self.model_info(timeout=timeout)
            self._limits = RequestLimits(info.max_request_tokens, info.max_request_groups)
        return self._limits

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        response = await self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout)
        return parse_model(response)

    async def reload_weights(
        self,
        checkpoint: str,
        *,
        admin_token: str,
        version: str = "",
        timeout: float | None = None,
    ) -> ReloadResult:
        """Reload every replica (see :meth:`ValueClient.reload_weights`)."""
        request, metadata = reload_request(checkpoint, version, admin_token)
        addresses = await asyncio.to_thread(replica_addresses, self.target)
        tasks = {
            address: asyncio.ensure_future(
                self._admin_call("ReloadWeights", address, request, metadata, timeout=timeout)
            )
            for address in addresses
        }
        await asyncio.wait(tasks.values())
        return _reload_outcome(tasks)

    async def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        admin_token: str,
        version: str = "",
        rendezvous: str | None = None,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        timeout: float | None = None,
    ) -> ReloadResult:
        """Send the trainer's weights to every replica (see :meth:`ValueClient.update_weights`).

        The transfer runs on a worker thread; the calls to the replicas on this loop.
        """
        from statevalue_client.weights import open_weight_sender

        sender = self._weights = open_weight_sender(self._weights, rendezvous)
        metadata = auth_metadata(admin_token)
        addresses = await asyncio.to_thread(replica_addresses, self.target)
        loop = asyncio.get_running_loop()

        def send(address: str, request: Any) -> Future[ModelInfo]:
            call = self._admin_call("UpdateWeights", address, request, metadata, timeout=timeout)
            return asyncio.run_coroutine_threadsafe(call, loop)

        calls = await asyncio.to_thread(
            sender.update,
            tensors,
            addresses=addresses,
            version=version,
            send=send,
            backend=backend,
            bucket_bytes=bucket_bytes,
            timeout=timeout or self.timeout,
        )
        return _reload_outcome(calls)

    async def _admin_call(
        self,
        rpc: str,
        address: str,
        request: Any,
        metadata: tuple[tuple[str, str], ...],
        *,
        timeout: float | None,
    ) -> ModelInfo:
        """An admin RPC (ReloadWeights, UpdateWeights) to one replica behind the target."""
        if address == self.target:
            method = getattr(self._stub, rpc)
            response = await method(request, timeout=timeout or self.timeout, metadata=metadata)
            return parse_model(response)
        async with _replica_channel(
            grpc.aio, address, self.target, self._max_message_bytes, self._credentials
        ) as channel:
            method = getattr(pb_grpc.ValueServiceStub(channel), rpc)
            response = await method(request, timeout=timeout or self.timeout, metadata=metadata)
            return parse_model(response)

    async def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncValueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
