"""gRPC front end (the trainers' path): statevalue.v1.ValueService over grpc.aio."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from statevalue.config import METHODS, EstimatorConfig
from statevalue.errors import error_reply
from statevalue.estimators.advantages import RewardStatistics
from statevalue.metrics import Metrics
from statevalue.request_ids import HEADER, request_id
from statevalue.schema import (
    EstimateRequest,
    EstimateResult,
    GroupInput,
    InvalidRequest,
    RolloutExplanation,
    RolloutInput,
    states_format,
)
from statevalue.weight_receiver import ProcessGroupOrder, SharedMemoryOrder, UpdateOrder
from statevalue_client.arrays import FLOAT32, INT32, pack_float32, pack_int32, unpack
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.weights import (
    BACKENDS,
    SEGMENT_PREFIX,
    TensorSpec,
    segment_layout,
    split_address,
    wire_dtype,
)

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ValueService"].full_name
# Trailing metadata of a refusal worth retrying later: seconds to wait, as HTTP's
# Retry-After header says (here with decimals).
RETRY_AFTER = "retry-after"
# The shared-memory segments a trainer names: a name, never a path elsewhere.
_SEGMENT_NAME = re.compile(re.escape(SEGMENT_PREFIX) + "[0-9a-f-]{1,200}")


def _packed(data: bytes, dtype: np.dtype, count: int, field: str) -> np.ndarray:
    try:
        return unpack(data, dtype, count, field)
    except ValueError as exc:
        raise InvalidRequest(field, str(exc).split(": ", 1)[1]) from exc


def params_from_proto(params: pb.EstimatorParams) -> EstimatorConfig:
    """Only the fields the caller set; the rest keep the service defaults."""
    tree: dict[str, dict[str, Any]] = {}
    for section in EstimatorConfig.model_fields:
        message = getattr(params, section)
        tree[section] = {f.name: value for f, value in message.ListFields()}
    try:
        return EstimatorConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InvalidRequest("params." + ".".join(str(p) for p in err["loc"]), err["msg"]) from exc


def params_to_proto(params: dict[str, dict[str, Any]]) -> pb.EstimatorParams:
    """``{"hista": {"node_spacing": 10}}`` -> EstimatorParams with exactly those fields set."""
    message = pb.EstimatorParams()
    for section, fields in params.items():
        for name, value in fields.items():
            setattr(getattr(message, section), name, value)
    return message


def model_info_to_proto(info: dict[str, Any]) -> pb.ModelInfo:
    """The ModelInfo message of ``StatevalueServer.model_info()``."""
    return pb.ModelInfo(**{**info, "default_params": params_to_proto(info["default_params"])})


def request_from_proto(message: pb.EstimateRequest) -> EstimateRequest:
    """The engine request of a protobuf request; raises InvalidRequest naming the field."""
    groups = []
    for g, group in enumerate(message.groups):
        where = f"groups[{g}]"
        rollouts = []
        for r, rollout in enumerate(group.rollouts):
            at = f"{where}.rollouts[{r}]"
            text = rollout.response_text if rollout.HasField("response_text") else None
            ids = None
            if text is None or rollout.response_ids:
                ids = _packed(rollout.response_ids, INT32, rollout.num_tokens, f"{at}.response_ids")
            token_rewards = None
            if rollout.token_rewards:
                count = len(ids) if ids is not None else None
                token_rewards = _packed(
                    rollout.token_rewards, FLOAT32, count, f"{at}.token_rewards"
                )
            rollouts.append(
                RolloutInput(
                    response_ids=ids,
                    response_text=text,
                    reward=rollout.reward if rollout.HasField("reward") else None,
                    token_rewards=token_rewards,
                    hista_states=rollout.hista_states,
                    num_hista_states=rollout.num_hista_states,
                )
            )
        has_text = group.HasField("prompt_text")
        prompt_ids = None
        if group.prompt_ids or not (has_text or group.messages):
            prompt_ids = _packed(
                group.prompt_ids, INT32, group.prompt_num_tokens, f"{where}.prompt_ids"
            )
        groups.append(
            GroupInput(
                rollouts=rollouts,
                group_id=group.group_id,
                prompt_id=group.prompt_id or None,
                idempotency_key=group.idempotency_key,
                prompt_ids=prompt_ids,
                prompt_text=group.prompt_text if has_text else None,
                messages=[{"role": m.role, "content": m.content} for m in group.messages] or None,
                prompt_hista_states=group.prompt_hista_states,
                prompt_num_hista_states=group.prompt_num_hista_states,
            )
        )
    return EstimateRequest(
        groups=groups,
        methods=tuple(message.methods) or METHODS,  # type: ignore[arg-type]
        config=params_from_proto(message.params),
        min_model_revision=message.min_model_revision,
        step_id=message.step_id,
        explain=message.explain,
        step_rewards=_step_rewards(message),
        hista_states=states_format(
            {
                f.name: getattr(message.hista_states, f.name)
                for f in pb.HistaStatesFormat.DESCRIPTOR.fields
            }
        )
        if message.HasField("hista_states")
        else None,
    )


def _step_rewards(message: pb.EstimateRequest) -> RewardStatistics | None:
    if not message.HasField("step_rewards"):
        return None
    stats = message.step_rewards
    if stats.count < 1:
        raise InvalidRequest("step_rewards.count", "must be at least 1")
    for name in ("mean", "sum_squared_deviations"):
        if not math.isfinite(getattr(stats, name)):
            raise InvalidRequest(f"step_rewards.{name}", "must be a finite number")
    if stats.sum_squared_deviations < 0:
        raise InvalidRequest("step_rewards.sum_squared_deviations", "must not be negative")
    return RewardStatistics(stats.count, stats.mean, stats.sum_squared_deviations)


def update_order_from_proto(message: pb.UpdateWeightsRequest) -> UpdateOrder:
    """The update a trainer announces; raises InvalidRequest naming the field."""
    if not message.group:
        raise InvalidRequest("group", "must name the trainer's group")
    if not message.tensors:
        raise InvalidRequest("tensors", "must list the tensors the trainer sends")
    if message.update < 1:
        raise InvalidRequest("update", "must be at least 1")
    specs = []
    for i, tensor in enumerate(message.tensors):
        try:
            dtype = wire_dtype(tensor.dtype)
        except ValueError as exc:
            raise InvalidRequest(f"tensors[{i}].dtype", str(exc)) from exc
        specs.append(TensorSpec(tensor.name, tuple(tensor.shape), dtype))
    if len({spec.name for spec in specs}) != len(specs):
        raise InvalidRequest("tensors", "names a tensor twice")
    common = {
        "group": message.group,
        "update": message.update,
        "version": message.version or f"{message.group[:8]}-{message.update}",
        "tensors": tuple(specs),
    }
    if message.HasField("shared_memory"):
        return _shared_memory_order(message, common)
    try:
        host, port = split_address(message.rendezvous)
    except ValueError as exc:
        raise InvalidRequest("rendezvous", str(exc)) from exc
    if message.world_size < 2:
        raise InvalidRequest("world_size", "must count the trainer and at least one replica")
    if not 1 <= message.rank < message.world_size:
        raise InvalidRequest("rank", f"must be in [1, {message.world_size - 1}]")
    if message.backend not in BACKENDS:
        raise InvalidRequest("backend", f"must be one of {', '.join(BACKENDS)}")
    if message.bucket_bytes < 1:
        raise InvalidRequest("bucket_bytes", "must be at least 1")
    return ProcessGroupOrder(
        **common,
        host=host,
        port=port,
        world_size=message.world_size,
        rank=message.rank,
        backend=message.backend,
        bucket_bytes=message.bucket_bytes,
    )


def _shared_memory_order(
    message: pb.UpdateWeightsRequest, common: dict[str, Any]
) -> SharedMemoryOrder:
    segment = message.shared_memory
    for field in ("rendezvous", "world_size", "rank", "backend", "bucket_bytes"):
        if getattr(message, field):
            raise InvalidRequest(field, "must stay empty with shared_memory (one transport)")
    if not _SEGMENT_NAME.fullmatch(segment.name):
        raise InvalidRequest("shared_memory.name", f"must be {SEGMENT_PREFIX} and hex digits")
    if not segment.host:
        raise InvalidRequest("shared_memory.host", "must name the trainer's host")
    needed = segment_layout(common["tensors"]).nbytes
    if segment.nbytes < needed:
        raise InvalidRequest("shared_memory.nbytes", f"the tensors take {needed} bytes")
    return SharedMemoryOrder(**common, segment=segment.name, trainer_host=segment.host)


def response_to_proto(result: EstimateResult) -> pb.EstimateResponse:
    response = pb.EstimateResponse(
        model=pb.ModelInfo(
            name=result.model.name, version=result.model.version, revision=result.model.revision
        ),
        forward_seconds=result.forward_seconds,
        estimator_seconds=result.estimator_seconds,
    )
    for group in result.groups:
        out = response.groups.add(group_id=group.group_id)
        for rollout in group.rollouts:
            item = out.rollouts.add()
            for method, values in rollout.values.items():
                item.num_tokens = len(values)
                entry = item.methods[method]
                entry.values = pack_float32(values)
                entry.advantages = pack_float32(rollout.advantages[method])
                entry.boundaries = pack_int32(rollout.boundaries[method])
            if rollout.explanation is not None:
                _explanation_to_proto(rollout.explanation, item.explanation)
        for method, choice in group.self_calibration.items():
            entry = out.self_calibration[method]
            entry.params.CopyFrom(params_to_proto(choice.params))
            entry.weights.update(choice.weights)
            entry.own_weight = choice.own_weight
            entry.own_weights.extend(choice.own_weights)
            entry.criterion = choice.criterion
            entry.group_mean_criterion = choice.group_mean_criterion
            entry.candidates = choice.candidates
            entry.scope = choice.scope
    return response


def _explanation_to_proto(explanation: RolloutExplanation, out: pb.RolloutExplanation) -> None:
    out.tokens.extend(explanation.tokens)
    for state in explanation.numca_states or ():
        out.numca_states.add(numbers=state)
    if explanation.numca_final_state is not None:
        out.numca_final_state.numbers.extend(explanation.numca_final_state)
    for node in explanation.hista_nodes or ():
        node_out = out.hista_nodes.add(token=node.token)
        for n in node.neighbours:
            node_out.neighbours.add(
                rollout=n.rollout, token=n.token, weight=n.weight, distance=n.distance
            )


def _answer_before(deadline_in: float | None) -> float | None:
    """Seconds the server gives a call: a little less than the caller's deadline, so the
    DEADLINE_EXCEEDED saying where the time went reaches the caller before its own timer
    ends the call with a bare "Deadline Exceeded"."""
    if deadline_in is None:
        return None
    return deadline_in - min(0.1 * deadline_in, 0.25)


def _refusal(exc: Exception, rid: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status, details and trailing metadata (a retry-after hint) a failed call ends
    with: its errors.py reply, or INTERNAL (logged with the request id; the caller gets the
    id, not the exception's text)."""
    reply = error_reply(exc)
    if reply is None:
        log.error("request_id=%s failed", rid, exc_info=exc)
        return grpc.StatusCode.INTERNAL, f"internal error (request {rid})", ()
    if reply.retry_after is None:
        return reply.grpc_code, reply.details, ()
    return reply.grpc_code, reply.details, ((RETRY_AFTER, f"{reply.retry_after:.3f}"),)


class ValueServicer(pb_grpc.ValueServiceServicer):
    """Maps RPCs onto the scheduler and its errors onto gRPC status codes."""

    def __init__(self, server: Any, metrics: Metrics) -> None:
        # ``server`` is the StatevalueServer; it owns the scheduler once the model is loaded.
        self._server = server
        self._metrics = metrics

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    async def Estimate(
        self, request: pb.EstimateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EstimateResponse:
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id(metadata.get(HEADER))
        echo = ((HEADER, rid),)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                result = await self._server.estimate(
                    request_from_proto(request),
                    metadata.get("authorization"),
                    _answer_before(context.time_remaining()),
                )
            except asyncio.CancelledError:
                # The caller went away or its deadline passed: no answer is sent.
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                code, details, trailer = _refusal(exc, rid)
                await context.abort(code, details, echo + trailer)
            context.set_trailing_metadata(echo)
            return response_to_proto(result)
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.requests.labels("grpc", "Estimate", code.name).inc()
            self._metrics.request_seconds.labels("grpc", "Estimate").observe(elapsed)
            log.info(
                "request_id=%s step_id=%s frontend=grpc rpc=Estimate status=%s groups=%d "
                "seconds=%.3f",
                rid,
                request.step_id or "-",
                code.name,
                len(request.groups),
                elapsed,
            )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        info = self._server.model_info()
        status = grpc.StatusCode.OK if info is not None else grpc.StatusCode.UNAVAILABLE
        self._metrics.requests.labels("grpc", "GetModelInfo", status.name).inc()
        if info is None:
            await context.abort(status, "the model is not ready (not loaded yet)")
        return model_info_to_proto(info)

    async def ReloadWeights(
        self, request: pb.ReloadWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        reload = self._server.reload(request.checkpoint, request.version or None, authorization)
        return await self._admin("ReloadWeights", reload, context)

    async def UpdateWeights(
        self, request: pb.UpdateWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        try:
            order = update_order_from_proto(request)
        except InvalidRequest as exc:
            self._metrics.requests.labels("grpc", "UpdateWeights", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        update = self._server.update_weights(order, authorization, context.time_remaining())
        return await self._admin("UpdateWeights", update, context)

    async def _admin(
        self, rpc: str, action: Awaitable[None], context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        """Run an admin action (a weight reload or update); answer with the model it left."""
        rid = request_id(dict(context.invocation_metadata() or ()).get(HEADER))
        code = grpc.StatusCode.OK
        try:
            await action
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, details, trailer = _refusal(exc, rid)
            await context.abort(code, details, ((HEADER, rid), *trailer))
        finally:
            self._metrics.requests.labels("grpc", rpc, code.name).inc()
        return model_info_to_proto(self._server.model_info())


# gRPC's "infinite" for durations in milliseconds (INT_MAX).
_NO_LIMIT_MS = 2**31 - 1


def build_grpc_server(
    servicer: ValueServicer, *, max_message_bytes: int, max_connection_age_s: float
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with the value service, standard health checks and reflection."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Closing connections after a while makes clients re-resolve the DNS name and
            # spread over replicas added since they connected.
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            # An old connection gets GOAWAY (new calls go on a new one) but is never cut
            # while a call is in flight: a call may be a long step's request that queued
            # behind minutes of work, and cutting it would throw that work away.
            ("grpc.max_connection_age_grace_ms", _NO_LIMIT_MS),
            # A second server on a taken port must fail, not share it (gRPC's default).
            ("grpc.so_reuseport", 0),
        ]
    )
    _add_value_service(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    # Last, so it only sees methods nobody serves.
    server.add_generic_rpc_handlers((_UnknownMethod(),))
    return server, health_servicer


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]

# How much of an unknown method's name an error repeats: callers control the name.
_SHOWN_METHOD_CHARS = 100


class _UnknownMethod(grpc.GenericRpcHandler):
    """UNIMPLEMENTED for any method nobody serves, naming at most the start of it."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        shown = method[:_SHOWN_METHOD_CHARS] + ("..." if len(method) > _SHOWN_METHOD_CHARS else "")

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {shown}")

        return grpc.unary_unary_rpc_method_handler(refuse)


def _decoding(rpc: str, message_type: Any, handler: Handler, metrics: Metrics) -> Handler:
    """``handler`` behind a decoder that answers undecodable bytes INVALID_ARGUMENT.

    Left to grpc, a message that fails to parse ends as UNKNOWN with a traceback in the log.
    """

    async def decode_then_handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            message = message_type.FromString(data)
        except DecodeError:
            metrics.requests.labels("grpc", rpc, grpc.StatusCode.INVALID_ARGUMENT.name).inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {message_type.DESCRIPTOR.full_name} message",
            )
        return await handler(message, context)

    return decode_then_handle


def _add_value_service(servicer: ValueServicer, server: grpc.aio.Server) -> None:
    """Register the value service with request decoding in our hands (see _decoding)."""
    rpcs = {
        "Estimate": (pb.EstimateRequest, pb.EstimateResponse, servicer.Estimate),
        "GetModelInfo": (pb.GetModelInfoRequest, pb.ModelInfo, servicer.GetModelInfo),
        "ReloadWeights": (pb.ReloadWeightsRequest, pb.ModelInfo, servicer.ReloadWeights),
        "UpdateWeights": (pb.UpdateWeightsRequest, pb.ModelInfo, servicer.UpdateWeights),
    }
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            _decoding(name, request_type, handler, servicer.metrics),
            response_serializer=response_type.SerializeToString,
        )
        for name, (request_type, response_type, handler) in rpcs.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
