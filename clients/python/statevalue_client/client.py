"""Blocking and asyncio clients of the statevalue gRPC service."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from statevalue_client.arrays import FLOAT32, INT32, pack_float32, pack_int32, unpack
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc

DEFAULT_METHODS = ("numca", "hista", "group_mean")
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)
_T = TypeVar("_T")


@dataclass
class Rollout:
    """One response as token ids; no reward makes it a query (values only, no statistics)."""

    response_ids: np.ndarray | Sequence[int]
    reward: float | None = None
    token_rewards: np.ndarray | Sequence[float] | None = None


@dataclass
class Group:
    """One prompt and its sampled rollouts. ``prompt_id`` lets Numca accumulate across steps."""

    prompt_ids: np.ndarray | Sequence[int]
    rollouts: list[Rollout]
    group_id: str = ""
    prompt_id: str = ""


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
    name: str
    version: str
    vocab_size: int = 0
    max_length: int = 0
    hidden_size: int = 0
    device: str = ""
    revision: int = 0


@dataclass
class EstimateResult:
    model: ModelInfo
    groups: list[GroupResult]
    forward_seconds: float = 0.0
    estimator_seconds: float = 0.0


# Targets that can name several addresses: dns:/// names and ipv4:/ipv6: address lists.
_MULTI_ADDRESS_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def channel_options(max_message_bytes: int, target: str) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    if target.startswith(_MULTI_ADDRESS_SCHEMES):
        # Spread calls over every address of the target (one per replica); gRPC's default
        # (pick_first) would send everything to the first address that answers.
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata of ``token``; none without one."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


def build_request(
    groups: Iterable[Group],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    min_model_revision: int = 0,
) -> pb.EstimateRequest:
    """The protobuf request for ``groups``; ``params`` maps numca/hista/advantage to fields."""
    request = pb.EstimateRequest(methods=list(methods), min_model_revision=min_model_revision)
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


def _backoff(attempt: int, base: float) -> float:
    return base * (2**attempt) * (0.5 + random.random())


class ValueClient:
    """Blocking client.

    Args:
        target: ``host:port``, ``dns:///name:port`` or ``ipv4:a:p,b:p`` (the last two
            round-robin over every address, one per replica).
        timeout: seconds per call (the server drops work whose deadline passed).
        retries: extra attempts on UNAVAILABLE (e.g. a replica restarting or draining),
            with back-off.
        backoff: first back-off in seconds; doubles per attempt, jittered.
        max_message_bytes: send/receive limit; must not exceed the server's.
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
        credentials: grpc.ChannelCredentials | None = None,
        api_token: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_codes = tuple(retry_codes)
        options = channel_options(max_message_bytes, target)
        self._metadata = auth_metadata(api_token)
        self._channel = (
            grpc.insecure_channel(target, options=options)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=options)
        )
        self._stub = pb_grpc.ValueServiceStub(self._channel)

    def _call(self, fn: Callable[..., _T], request: Any, timeout: float | None) -> _T:
        for attempt in range(self.retries + 1):
            try:
                return fn(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in self.retry_codes or attempt == self.retries:
                    raise
                time.sleep(_backoff(attempt, self.backoff))
        raise AssertionError("unreachable")

    def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        timeout: float | None = None,
        min_model_revision: int = 0,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups``.

        ``params`` are per-section estimator parameters, e.g.
        ``hista={"d_min": 2.0}, advantage={"scale": "none"}``. ``min_model_revision``
        makes the server refuse (FAILED_PRECONDITION) while its weights are older.
        """
        request = build_request(groups, methods, params, min_model_revision)
        return parse_response(self._call(self._stub.Estimate, request, timeout))

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        return parse_model(self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout))

    def reload_weights(
        self,
        checkpoint: str,
        *,
        admin_token: str,
        version: str = "",
        timeout: float | None = None,
    ) -> ModelInfo:
        """Load the checkpoint directory ``checkpoint`` (a path on the server) as new weights."""
        request, metadata = reload_request(checkpoint, version, admin_token)
        response = self._stub.ReloadWeights(
            request, timeout=timeout or self.timeout, metadata=metadata
        )
        return parse_model(response)

    def close(self) -> None:
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
        credentials: grpc.ChannelCredentials | None = None,
        api_token: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.retry_codes = tuple(retry_codes)
        options = channel_options(max_message_bytes, target)
        self._metadata = auth_metadata(api_token)
        self._channel = (
            grpc.aio.insecure_channel(target, options=options)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials, options=options)
        )
        self._stub = pb_grpc.ValueServiceStub(self._channel)

    async def _call(self, fn: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return await fn(request, timeout=timeout or self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in self.retry_codes or attempt == self.retries:
                    raise
                await asyncio.sleep(_backoff(attempt, self.backoff))
        raise AssertionError("unreachable")

    async def estimate(
        self,
        groups: Iterable[Group],
        methods: Sequence[str] = DEFAULT_METHODS,
        *,
        timeout: float | None = None,
        min_model_revision: int = 0,
        **params: Mapping[str, Any],
    ) -> EstimateResult:
        """Values and advantages for ``groups`` (see :meth:`ValueClient.estimate`)."""
        request = build_request(groups, methods, params, min_model_revision)
        return parse_response(await self._call(self._stub.Estimate, request, timeout))

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
    ) -> ModelInfo:
        """Load the checkpoint directory ``checkpoint`` (a path on the server) as new weights."""
        request, metadata = reload_request(checkpoint, version, admin_token)
        response = await self._stub.ReloadWeights(
            request, timeout=timeout or self.timeout, metadata=metadata
        )
        return parse_model(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncValueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
