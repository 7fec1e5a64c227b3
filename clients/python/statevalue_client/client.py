"""Blocking and asyncio clients of the statevalue gRPC service.

Both are thin shells over :mod:`statevalue_client.step`, which decides everything about a
step (requests, timeouts, retries, resuming, merging); the shells only send, wait and
sleep, each in its own way.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import queue
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from statevalue_client.chunking import RequestLimits
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.step import (
    DEFAULT_REQUEST_SECONDS,
    DEFAULT_UNAVAILABLE_WAIT_S,
    RETRY_CODES,
    Attempt,
    ProgressCallback,
    RetryPolicy,
    Step,
    StepFailed,
    describe_error,
    error_code,
)
from statevalue_client.targets import is_multi_address, replica_addresses
from statevalue_client.wire import (
    EstimateResult,
    Group,
    GroupResult,
    ModelInfo,
    Rollout,
    RolloutResult,
    auth_metadata,
    build_request,
    parse_model,
    parse_response,
    reload_request,
)

__all__ = [
    "RETRY_CODES",
    "AsyncValueClient",
    "EstimateResult",
    "Group",
    "GroupResult",
    "ModelInfo",
    "ReloadFailed",
    "ReloadResult",
    "Rollout",
    "RolloutResult",
    "StepFailed",
    "ValueClient",
    "build_request",
    "parse_response",
]

if TYPE_CHECKING:
    # The weight updates need torch, which only trainers have; the rest of the client not.
    import torch

    from statevalue_client.weights import WeightSender

DEFAULT_METHODS = ("numca", "hista", "group_mean")
DEFAULT_MAX_IN_FLIGHT = 4
# Timeout of GetModelInfo, and of ReloadWeights (which reads a checkpoint), unless given.
INFO_TIMEOUT_S = 60.0
RELOAD_TIMEOUT_S = 600.0
# Failed steps each client keeps for resuming by step id.
_REMEMBERED_STEPS = 8
_T = TypeVar("_T")


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
        failed = "; ".join(f"{address}: {describe_error(exc)}" for address, exc in errors.items())
        super().__init__(
            f"reload failed on {len(errors)} of {len(errors) + len(reloaded)} replicas: {failed}"
        )
        self.errors = errors
        self.reloaded = reloaded

    def code(self) -> grpc.StatusCode:
        return error_code(next(iter(self.errors.values())))

    def details(self) -> str:
        return str(self)


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


def _reload_outcome(
    calls: Mapping[str, grpc.Future | asyncio.Task[ModelInfo]],
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


class _ClientBase:
    """The arguments both clients share, their channel, and what they remember between
    calls; ``_grpc`` is the module whose channels a client uses (grpc or grpc.aio)."""

    _grpc: Any = grpc

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        retries: int | None = None,
        backoff: float = 0.2,
        max_message_bytes: int = 256 << 20,
        retry_codes: Sequence[grpc.StatusCode] = RETRY_CODES,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        credentials: grpc.ChannelCredentials | None = None,
        api_token: str | None = None,
        unavailable_wait_s: float = DEFAULT_UNAVAILABLE_WAIT_S,
        request_seconds: float = DEFAULT_REQUEST_SECONDS,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        if request_seconds <= 0:
            raise ValueError(f"request_seconds must be positive, not {request_seconds}")
        self.target = target
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_codes = tuple(retry_codes)
        self.unavailable_wait_s = unavailable_wait_s
        self.max_in_flight = max_in_flight
        self.request_seconds = request_seconds
        self.policy = RetryPolicy(retries, backoff, unavailable_wait_s, self.retry_codes)
        self._max_message_bytes = max_message_bytes
        self._credentials = credentials
        self._options = channel_options(max_message_bytes, target)
        self._metadata = auth_metadata(api_token)
        self._limits: RequestLimits | None = None
        self._failed_steps: OrderedDict[str, StepFailed] = OrderedDict()
        self._channel = (
            self._grpc.insecure_channel(target, options=self._options)
            if credentials is None
            else self._grpc.secure_channel(target, credentials, options=self._options)
        )
        self._stub = pb_grpc.ValueServiceStub(self._channel)
        self._weights: WeightSender | None = None

    def _new_step(
        self,
        groups: Iterable[Group],
        methods: Sequence[str],
        params: Mapping[str, Mapping[str, Any]],
        info: ModelInfo,
        *,
        started: float,
        deadline: float | None,
        timeout: float | None,
        min_model_revision: int,
        step_id: str | None,
        resume: StepFailed | None,
        progress: ProgressCallback | None,
        progress_bar: bool,
    ) -> Step:
        if resume is None and step_id is not None:
            resume = self._failed_steps.get(step_id)
        return Step(
            groups,
            methods,
            params,
            min_model_revision=min_model_revision,
            step_id=step_id,
            limits=RequestLimits(info.max_request_tokens, info.max_request_groups),
            tokens_per_second=info.tokens_per_second,
            request_seconds=self.request_seconds,
            deadline=None if deadline is None else started + deadline,
            timeout=timeout if timeout is not None else self.timeout,
            policy=self.policy,
            now=started,
            resume=resume,
            progress=progress,
            progress_bar=progress_bar,
        )

    def _outcome(self, step: Step) -> EstimateResult:
        """The step's result; a failed step is remembered so its id resumes it."""
        try:
            result = step.outcome()
        except StepFailed as exc:
            self._failed_steps[exc.step_id] = exc
            self._failed_steps.move_to_end(exc.step_id)
            while len(self._failed_steps) > _REMEMBERED_STEPS:
                self._failed_steps.popitem(last=False)
            raise
        self._failed_steps.pop(step.step_id, None)
        return result

    def _remember_limits(self, info: ModelInfo) -> ModelInfo:
        self._limits = RequestLimits(info.max_request_tokens, info.max_request_groups)
        return info

    def _weight_update(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        *,
        rendezvous: str | None,
        version: str,
        transport: str,
        backend: str,
        bucket_bytes: int | None,
        timeout: float | None,
    ) -> Callable[..., dict[str, Future[Any]]]:
        """One ``update_weights`` call, to run with the replicas' ``addresses`` and a
        ``send``: the sender (opened once, then reused) and every argument but those."""
        from statevalue_client.weights import open_weight_sender

        self._weights = open_weight_sender(self._weights, rendezvous)
        return functools.partial(
            self._weights.update,
            tensors,
            version=version,
            transport=transport,
            backend=backend,
            bucket_bytes=bucket_bytes,
            timeout=timeout or RELOAD_TIMEOUT_S,
        )

    def _admin_stub(self, address: str) -> tuple[pb_grpc.ValueServiceStub, Any]:
        """The stub for an admin RPC (ReloadWeights, UpdateWeights) to one replica behind
        the target, and the channel to close after the call (None: the client's own)."""
        if address == self.target:
            return self._stub, None
        channel = _replica_channel(
            self._grpc, address, self.target, self._max_message_bytes, self._credentials
        )
        return pb_grpc.ValueServiceStub(channel), channel

    def _info_timeout(self, started: float, deadline: float | None) -> float:
        """GetModelInfo's timeout within a step: its own, cut to the step's deadline."""
        timeout = INFO_TIMEOUT_S
        if deadline is not None:
            timeout = min(timeout, max(0.001, started + deadline - time.monotonic()))
        return timeout


class ValueClient(_ClientBase):
    """Blocking client.

    Args:
        target: ``host:port``, or ``dns:///name:port`` / ``ipv4:a:port,b:port`` (round-robin
            over every replica).
        timeout: a fixed timeout for every request; by default each request's timeout
            follows from its size and the server's advertised throughput, with margin.
        retries: retries per request of UNAVAILABLE (a replica restarting or draining),
            RESOURCE_EXHAUSTED (a full queue) and CANCELLED (a replica's gRPC server
            shutting down under the call); None (default): until the step's deadline, as
            long as the service shows signs of life; 0 never retries.
        backoff: first back-off in seconds when the server gives no Retry-After; doubles
            per attempt, jittered, at most 2 s.
        unavailable_wait_s: give up on UNAVAILABLE after this long without a sign of life
            from the service, so a call outlasts a replica's restart but not a dead address.
        max_message_bytes: send/receive limit; must not exceed the server's.
        max_in_flight: requests of one ``estimate()`` call sent at once.
        credentials: TLS channel credentials (``grpc.ssl_channel_credentials``) for a
            server started with a certificate; plaintext without.
        api_token: bearer token for a server that requires one on Estimate.
        request_seconds: server work per request the client cuts a step into.
    """

    def _call(self, fn: Callable[..., _T], request: Any, timeout: float) -> _T:
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return fn(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = self.policy.delay(exc, attempt, started, time.monotonic())
                if delay is None:
                    raise
                time.sleep(delay)
        raise AssertionError("unreachable")

    def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        deadline: float | None = None,
        timeout: float | None = None,
        min_model_revision: int = 0,
        step_id: str | None = None,
        resume: StepFailed | None = None,
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups``: any number of them, e.g. a whole step.

        The step is cut into requests of about ``request_seconds`` of server work each
        (from the throughput the server advertises, within its per-request limits), at
        most ``max_in_flight`` sent at once (over every replica of a multi-address
        target), oldest first; the results come back in the order of ``groups``. Every
        request carries ``step_id`` (default: a fresh random id).

        Time belongs to the step: ``deadline`` (seconds; default none) bounds the whole
        call, and each request's timeout follows from its size. Refusals that counted
        nothing are retried after the server's Retry-After until the deadline. If the
        step fails, :class:`StepFailed` keeps every finished group; ``resume=`` that
        error, or the same ``step_id`` on the same client, sends only the rest.

        ``progress`` is called with a :class:`StepProgress` after each request;
        ``progress_bar`` shows a tqdm bar of tokens with an ETA. ``params`` are
        per-section estimator parameters, e.g. ``hista={"d_min": 2.0},
        advantage={"scale": "none"}``. ``min_model_revision`` makes the server refuse
        (FAILED_PRECONDITION) while its weights are older. ``timeout`` fixes every
        request's timeout instead.

        Raises:
            ValueError: duplicate group ids, a group alone over the token limit, or a
                ``resume`` of other groups.
            StepFailed: the step did not finish; it names the groups and keeps the rest.
                A call sent as one request that failed raises its ``grpc.RpcError``.
        """
        started = time.monotonic()
        info = self.model_info(timeout=self._info_timeout(started, deadline))
        step = self._new_step(
            groups,
            methods,
            params,
            info,
            started=started,
            deadline=deadline,
            timeout=timeout,
            min_model_revision=min_model_revision,
            step_id=step_id,
            resume=resume,
            progress=progress,
            progress_bar=progress_bar,
        )
        answered: queue.SimpleQueue[tuple[Attempt, Any]] = queue.SimpleQueue()
        running: dict[int, Any] = {}
        try:
            while not step.finished:
                now = time.monotonic()
                while len(running) < self.max_in_flight:
                    attempt = step.next_attempt(now)
                    if attempt is None:
                        break
                    call = self._stub.Estimate.future(
                        attempt.request, timeout=attempt.timeout, metadata=self._metadata
                    )
                    running[attempt.index] = call
                    call.add_done_callback(lambda c, a=attempt: answered.put((a, c)))
                wait = step.wait_time(now)
                if not running:
                    if wait is not None:
                        time.sleep(wait)
                    continue
                try:
                    attempt, call = answered.get(timeout=wait)
                except queue.Empty:
                    continue
                del running[attempt.index]
                try:
                    response = call.result()
                except grpc.RpcError as exc:
                    step.failed(attempt, exc, time.monotonic())
                else:
                    step.succeeded(attempt, response, time.monotonic())
        finally:
            # Only reached with calls running when the caller is interrupted: cancelling
            # them stops their work on the server.
            for call in running.values():
                call.cancel()
        return self._outcome(step)

    def request_limits(self, *, timeout: float | None = None) -> RequestLimits:
        """The server's per-request limits (asked once, then remembered)."""
        if self._limits is None:
            self.model_info(timeout=timeout)
        assert self._limits is not None
        return self._limits

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model, its limits and its current throughput."""
        info = self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout or INFO_TIMEOUT_S
        )
        return self._remember_limits(parse_model(info))

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
        transport: str = "auto",
        rendezvous: str | None = None,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        timeout: float | None = None,
    ) -> ReloadResult:
        """Send the trainer's current weights from memory to every replica behind the target.

        ``tensors``: a (gathered) state dict or ``named_parameters()``. ``transport``:

        - ``"shared_memory"``: for replicas on this machine. The tensors are copied once
          into a POSIX shared-memory segment that every replica copies from; no byte goes
          through the network stack. A replica elsewhere refuses (FAILED_PRECONDITION).
        - ``"distributed"``: the first call opens a TCP store at ``rendezvous``
          (``host:port`` the replicas reach; default: this machine's address towards
          them, any free port) and a process group with the replicas; later calls reuse
          both. ``backend``: ``"gloo"``, ``"nccl"`` or ``"auto"`` (NCCL when the tensors
          are on CUDA); buckets of at most ``bucket_bytes`` (default 128 MiB).
        - ``"auto"`` (default): shared memory when every replica's address is this
          machine's, distributed otherwise.

        Each replica checks names and shapes before any byte moves, receives the tensors
        into a staged copy and swaps it in between two forward steps, all or nothing
        (docs/integrations.md). Needs torch.

        Raises:
            ReloadFailed: some replicas did not take the new weights (it says which, and
                why); they keep serving their old ones.
        """
        update = self._weight_update(
            tensors,
            rendezvous=rendezvous,
            version=version,
            transport=transport,
            backend=backend,
            bucket_bytes=bucket_bytes,
            timeout=timeout,
        )
        metadata = auth_metadata(admin_token)
        call = functools.partial(self._admin_call, "UpdateWeights", timeout=timeout)
        addresses = replica_addresses(self.target)
        with ThreadPoolExecutor(len(addresses), thread_name_prefix="statevalue-weights") as pool:
            calls = update(
                addresses=addresses,
                send=lambda address, request: pool.submit(call, address, request, metadata),
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
        stub, channel = self._admin_stub(address)
        try:
            method = getattr(stub, rpc)
            return parse_model(
                method(request, timeout=timeout or RELOAD_TIMEOUT_S, metadata=metadata)
            )
        finally:
            if channel is not None:
                channel.close()

    def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
        self._channel.close()

    def __enter__(self) -> ValueClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncValueClient(_ClientBase):
    """asyncio client with the same arguments and methods as :class:`ValueClient`."""

    _grpc = grpc.aio

    async def _call(self, fn: Callable[..., Any], request: Any, timeout: float) -> Any:
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                return await fn(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                delay = self.policy.delay(exc, attempt, started, time.monotonic())
                if delay is None:
                    raise
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        deadline: float | None = None,
        timeout: float | None = None,
        min_model_revision: int = 0,
        step_id: str | None = None,
        resume: StepFailed | None = None,
        progress: ProgressCallback | None = None,
        progress_bar: bool = False,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups`` (see :meth:`ValueClient.estimate`)."""
        started = time.monotonic()
        info = await self.model_info(timeout=self._info_timeout(started, deadline))
        step = self._new_step(
            groups,
            methods,
            params,
            info,
            started=started,
            deadline=deadline,
            timeout=timeout,
            min_model_revision=min_model_revision,
            step_id=step_id,
            resume=resume,
            progress=progress,
            progress_bar=progress_bar,
        )
        running: dict[asyncio.Future[pb.EstimateResponse], Attempt] = {}
        try:
            while not step.finished:
                now = time.monotonic()
                while len(running) < self.max_in_flight:
                    attempt = step.next_attempt(now)
                    if attempt is None:
                        break
                    call = self._stub.Estimate(
                        attempt.request, timeout=attempt.timeout, metadata=self._metadata
                    )
                    running[asyncio.ensure_future(call)] = attempt
                wait = step.wait_time(now)
                if not running:
                    if wait is not None:
                        await asyncio.sleep(wait)
                    continue
                finished, _ = await asyncio.wait(
                    running, timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                for task in finished:
                    attempt = running.pop(task)
                    try:
                        response = task.result()
                    except grpc.aio.AioRpcError as exc:
                        step.failed(attempt, exc, time.monotonic())
                    else:
                        step.succeeded(attempt, response, time.monotonic())
        finally:
            for task in running:
                task.cancel()
        return self._outcome(step)

    async def request_limits(self, *, timeout: float | None = None) -> RequestLimits:
        """The server's per-request limits (asked once, then remembered)."""
        if self._limits is None:
            await self.model_info(timeout=timeout)
        assert self._limits is not None
        return self._limits

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model, its limits and its current throughput."""
        info = await self._call(
            self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout or INFO_TIMEOUT_S
        )
        return self._remember_limits(parse_model(info))

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
        transport: str = "auto",
        rendezvous: str | None = None,
        backend: str = "auto",
        bucket_bytes: int | None = None,
        timeout: float | None = None,
    ) -> ReloadResult:
        """Send the trainer's weights to every replica (see :meth:`ValueClient.update_weights`).

        The transfer runs on a worker thread; the calls to the replicas on this loop.
        """
        update = self._weight_update(
            tensors,
            rendezvous=rendezvous,
            version=version,
            transport=transport,
            backend=backend,
            bucket_bytes=bucket_bytes,
            timeout=timeout,
        )
        metadata = auth_metadata(admin_token)
        addresses = await asyncio.to_thread(replica_addresses, self.target)
        loop = asyncio.get_running_loop()

        def send(address: str, request: Any) -> Future[ModelInfo]:
            call = self._admin_call("UpdateWeights", address, request, metadata, timeout=timeout)
            return asyncio.run_coroutine_threadsafe(call, loop)

        calls = await asyncio.to_thread(update, addresses=addresses, send=send)
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
        stub, channel = self._admin_stub(address)
        try:
            method = getattr(stub, rpc)
            response = await method(request, timeout=timeout or RELOAD_TIMEOUT_S, metadata=metadata)
            return parse_model(response)
        finally:
            if channel is not None:
                await channel.close()

    async def close(self) -> None:
        if self._weights is not None:
            self._weights.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncValueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
