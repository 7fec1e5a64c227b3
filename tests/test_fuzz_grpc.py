"""Hypothesis against the gRPC Estimate message: counts that disagree with the packed
bytes, truncated bytes, huge counts, NaN and huge rewards, negative and huge ids, and raw
garbage. Every answer is OK with finite numbers or a clean INVALID_ARGUMENT; never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.wire import parse_response
from tests.servers import running_server

ESTIMATE = "/statevalue.v1.ValueService/Estimate"
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
FUZZ = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def channel(backend: TorchBackend) -> Iterator[grpc.Channel]:
    with running_server(backend) as server, grpc.insecure_channel(server.grpc_target) as chan:
        yield chan


ids = st.lists(
    st.one_of(st.integers(0, 5000), st.integers(-(2**31), 2**31 - 1)), min_size=0, max_size=12
)
rewards = st.one_of(
    st.none(),
    st.floats(-1.0, 1.0),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)


@st.composite
def packed(draw: st.DrawFn, values: list[int]) -> tuple[bytes, int]:
    """int32 bytes of ``values`` and a count: usually right, sometimes a lie or truncated."""
    data = np.asarray(values, dtype="<i4").tobytes()
    count = len(values)
    damage = draw(st.sampled_from(["none", "none", "count", "huge", "truncate"]))
    if damage == "count":
        count = draw(st.integers(0, 20))
    elif damage == "huge":
        count = draw(st.integers(2**20, 2**31 - 1))
    elif damage == "truncate" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data, count


@st.composite
def estimate_requests(draw: st.DrawFn) -> pb.EstimateRequest:
    request = pb.EstimateRequest(
        methods=draw(
            st.lists(st.sampled_from(["numca", "group_mean", "hista", "other"]), max_size=3)
        )
    )
    if draw(st.booleans()):
        request.params.advantage.scale_eps = draw(st.sampled_from([0.0, 1e-300, 1e-4]))
    for g in range(draw(st.integers(0, 2))):
        prompt, prompt_count = draw(packed(draw(ids)))
        group = request.groups.add(
            group_id=f"g{g}", prompt_ids=prompt, prompt_num_tokens=prompt_count
        )
        for _ in range(draw(st.integers(0, 3))):
            response, count = draw(packed(draw(ids)))
            rollout = group.rollouts.add(response_ids=response, num_tokens=count)
            reward = draw(rewards)
            if reward is not None:
                rollout.reward = reward
    return request


def _check(channel: grpc.Channel, request: pb.EstimateRequest) -> None:
    call = channel.unary_unary(
        ESTIMATE,
        request_serializer=pb.EstimateRequest.SerializeToString,
        response_deserializer=pb.EstimateResponse.FromString,
    )
    try:
        response = call(request, timeout=60)
    except grpc.RpcError as exc:
        assert exc.code() in CLEAN, (exc.code(), exc.details())
        assert len(exc.details()) < 2000
        return
    result = parse_response(response)
    for group, sent in zip(result.groups, request.groups, strict=True):
        for rollout, sent_rollout in zip(group.rollouts, sent.rollouts, strict=True):
            for method, values in rollout.values.items():
                assert len(values) == sent_rollout.num_tokens
                assert np.isfinite(values).all() and np.isfinite(rollout.advantages[method]).all()
                if sent_rollout.HasField("reward"):
                    assert math.isfinite(sent_rollout.reward)


@FUZZ
@given(request=estimate_requests())
def test_fuzzed_estimate_messages_answer_cleanly(
    channel: grpc.Channel, request: pb.EstimateRequest
) -> None:
    _check(channel, request)


@FUZZ
@given(data=st.binary(max_size=200))
def test_raw_bytes_answer_cleanly(channel: grpc.Channel, data: bytes) -> None:
    call = channel.unary_unary(ESTIMATE)
    try:
        call(data, timeout=60)
    except grpc.RpcError as exc:
        # Random bytes may decode to a request for newer weights than the server has.
        assert exc.code() in {*CLEAN, grpc.StatusCode.FAILED_PRECONDITION}, exc.details()
