"""Hista from representations the trainer sends: the helper, the wire and ``--backend none``."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable

import grpc
import httpx
import numpy as np
import pytest
import torch

from statevalue.backends.no_model import NoModelBackend
from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import HistaConfig
from statevalue.engine import Engine
from statevalue.estimators.hista import hista_representation
from statevalue.grpc_server import request_from_proto
from statevalue.schema import EstimateRequest, InvalidRequest
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.arrays import pack_vectors, unpack_vectors
from statevalue_client.states import (
    FinalNormCapture,
    GroupStates,
    StatesFormat,
    batch_states,
    group_states,
    projection_matrix,
    representation_counts,
)
from statevalue_client.wire import build_request
from tests.conftest import APPLES
from tests.servers import Serve, running_server, serve_ready, wait_for

RESPONSES = [
    "He has 8 apples.",
    "5 + 3 = 8, so the answer is 8 apples in total.",
    "7",
    "Tom had 5 apples. He bought 3 more apples, so now he has 5 + 3 = 8 apples.",
]
REWARDS = [1.0, 1.0, 0.0, 1.0]
# A fixed node spacing puts several interior nodes on these short answers.
HISTA = {"node_spacing": 4}


@pytest.fixture(scope="module")
def group(backend: TorchBackend) -> Group:
    tokenizer = backend.tokenizer
    return Group(
        prompt_ids=np.array(tokenizer.encode(APPLES), dtype=np.int32),
        rollouts=[
            Rollout(np.array(tokenizer.encode(text), dtype=np.int32), reward)
            for text, reward in zip(RESPONSES, REWARDS, strict=True)
        ],
        group_id="apples",
    )


def sequences(group: Group) -> list[np.ndarray]:
    return [np.concatenate([group.prompt_ids, r.response_ids]) for r in group.rollouts]


def server_states(backend: TorchBackend, group: Group, format: StatesFormat) -> GroupStates:
    """The states from the server's own hidden states of ``group``."""
    return group_states(backend.hidden_states(sequences(group)), len(group.prompt_ids), format)


def engine_request(group: Group, **params: object) -> EstimateRequest:
    """The engine request the gRPC front end makes of ``group`` (states included)."""
    return request_from_proto(build_request([group], ("hista",), {"hista": {**HISTA, **params}}))


def hista_of(engine: Engine, request: EstimateRequest) -> list[np.ndarray]:
    result = engine.estimate(request)
    return [r.values["hista"] for r in result.groups[0].rollouts]


def test_the_helper_equals_the_servers_representation(backend: TorchBackend, group: Group) -> None:
    """A trainer's left-padded forward pass with the final-norm hook gives the server's
    representation to float32 precision."""
    seqs = sequences(group)
    hidden = backend.hidden_states(seqs)
    reps, counts = hista_representation(hidden, HistaConfig())
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.from_numpy(seq.astype(np.int64))
        mask[row, width - len(seq) :] = 1
    capture = FinalNormCapture(backend._causal_lm)
    with capture, torch.inference_mode():
        backend._causal_lm(input_ids=ids, attention_mask=mask)
    assert capture.hidden is not None
    (states,) = batch_states(
        capture.hidden, mask, [len(group.prompt_ids)], [len(seqs)], StatesFormat(576)
    )
    scale = float(reps.abs().max())
    for i, own in enumerate(states.rollouts):
        mine = np.concatenate([states.prompt, own])
        assert mine.shape == (counts[i], 576)
        np.testing.assert_allclose(mine, reps[i, : counts[i]].numpy(), rtol=0, atol=1e-6 * scale)


def test_values_from_sent_float32_states_equal_the_forward_path(
    backend: TorchBackend, group: Group
) -> None:
    engine = Engine(backend)
    expected = hista_of(engine, engine_request(group))
    sent = dataclasses.replace(group, hista_states=server_states(backend, group, StatesFormat(576)))
    request = engine_request(sent)
    assert request.hista_states is not None
    prepared = engine.prepare(request)
    assert not prepared.needs_hidden_states
    got = hista_of(engine, request)
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5)
    assert any(len(np.unique(v)) > 2 for v in got), "interior nodes carry neighbour values"


def test_projected_half_precision_states_stay_close(backend: TorchBackend, group: Group) -> None:
    engine = Engine(backend)
    expected = hista_of(engine, engine_request(group))
    format = StatesFormat(256, dtype="bfloat16", projection="gaussian", projection_seed=7)
    sent = dataclasses.replace(group, hista_states=server_states(backend, group, format))
    got = hista_of(engine, engine_request(sent))
    error = np.mean(np.abs(np.concatenate(got) - np.concatenate(expected)))
    assert error < 0.1


def test_vector_packing_round_trips() -> None:
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32) * 100
    for dtype, tolerance in (("float32", 0), ("float16", 1e-3), ("bfloat16", 8e-3)):
        back = unpack_vectors(pack_vectors(vectors, dtype), dtype, 3, 5)
        np.testing.assert_allclose(back, vectors, rtol=tolerance)
    bfloat16 = torch.from_numpy(vectors).bfloat16().float().numpy()
    np.testing.assert_array_equal(
        unpack_vectors(pack_vectors(vectors, "bfloat16"), "bfloat16", 3, 5), bfloat16
    )
    with pytest.raises(ValueError, match="4 vectors of 5 float16 values take 40"):
        unpack_vectors(pack_vectors(vectors, "float16"), "float16", 4, 5)


def test_the_projection_is_seeded_and_keeps_distances() -> None:
    a = projection_matrix(3, 576, 256)
    np.testing.assert_array_equal(a, projection_matrix(3, 576, 256))
    assert not np.array_equal(a, projection_matrix(4, 576, 256))
    x = np.random.default_rng(1).standard_normal((20, 576)).astype(np.float32)
    before = np.linalg.norm(x[:, None] - x[None], axis=-1)
    after = np.linalg.norm((x @ a)[:, None] - (x @ a)[None], axis=-1)
    off = ~np.eye(20, dtype=bool)
    assert np.abs(after[off] / before[off] - 1).max() < 0.25


def test_counts_follow_the_stride_rules() -> None:
    assert representation_counts(12, 8, 5, "inclusive") == (3, 1)  # 0, 5, 10 | 15
    assert representation_counts(12, 8, 5, "causal") == (2, 2)  # 4, 9 | 14, 19
    assert representation_counts(2, 1, 5, "causal") == (0, 1)  # shorter than the stride


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"stride": 3}, "hista_states.stride"),
        ({"ema_alpha": 0.5}, "hista_states.ema_alpha"),
        ({"ema_start": "zero"}, "hista_states.ema_start"),
        ({"downsample": "causal"}, "hista_states.downsample"),
        ({"layer": 3}, "hista_states.layer"),
        ({"dimension": 100}, "hista_states.dimension"),
    ],
)
def test_a_format_other_than_the_settings_is_refused(
    backend: TorchBackend, group: Group, change: dict[str, object], field: str
) -> None:
    states = server_states(backend, group, StatesFormat(576))
    if "dimension" in change:
        states = GroupStates(
            StatesFormat(100), states.prompt[:, :100], [r[:, :100] for r in states.rollouts]
        )
    else:
        states.format = dataclasses.replace(states.format, **change)
    request = engine_request(dataclasses.replace(group, hista_states=states))
    with pytest.raises(InvalidRequest) as refused:
        Engine(backend).prepare(request)
    assert refused.value.field == field


def test_counts_must_agree_with_the_token_ids(backend: TorchBackend, group: Group) -> None:
    states = server_states(backend, group, StatesFormat(576))
    states.rollouts[1] = states.rollouts[1][:-1]
    request = engine_request(dataclasses.replace(group, hista_states=states))
    with pytest.raises(InvalidRequest, match="call for") as refused:
        Engine(backend).prepare(request)
    assert refused.value.field == "groups[0].rollouts[1].hista_states"


def test_a_request_carries_states_for_every_group_or_none(
    backend: TorchBackend, group: Group
) -> None:
    sent = dataclasses.replace(group, hista_states=server_states(backend, group, StatesFormat(576)))
    with pytest.raises(ValueError, match="every group"):
        build_request([sent, dataclasses.replace(group, group_id="other")], ("hista",), {})


@pytest.fixture(scope="module")
def no_model() -> NoModelBackend:
    return NoModelBackend("embedded")


def test_backend_none_serves_hista_from_sent_states_only(
    backend: TorchBackend, no_model: NoModelBackend, group: Group
) -> None:
    """A server with no model over real gRPC and HTTP: Numca and the group mean as usual,
    Hista from the sent states equal to the forward path's, and a clear refusal without."""
    expected = hista_of(Engine(backend), engine_request(group))
    states = server_states(backend, group, StatesFormat(576))
    sent = dataclasses.replace(group, hista_states=states)
    with running_server(no_model) as server, ValueClient(server.grpc_target) as client:
        info = client.model_info()
        assert (info.backend, info.forward_path, info.hidden_size) == ("none", "none", 576)
        result = client.estimate([sent], ("hista", "numca", "group_mean"), hista=HISTA)
        assert result.forward_seconds == 0.0
        for rollout, theirs in zip(result.groups[0].rollouts, expected, strict=True):
            np.testing.assert_allclose(rollout.values["hista"], theirs, rtol=0, atol=1e-5)
        assert client.estimate([group], ("numca", "group_mean")).groups[0].rollouts
        with pytest.raises(grpc.RpcError) as refused:
            client.estimate([group], ("hista",))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "hista_states" in (refused.value.details() or "")

        body = {
            "methods": ["hista"],
            "params": {"hista": HISTA},
            "hista_states": StatesFormat(576).as_dict(),
            "groups": [
                {
                    "prompt_ids": group.prompt_ids.tolist(),
                    "prompt_hista_states": base64.b64encode(
                        pack_vectors(states.prompt, "float32")
                    ).decode(),
                    "prompt_num_hista_states": len(states.prompt),
                    "rollouts": [
                        {
                            "response_ids": r.response_ids.tolist(),
                            "reward": r.reward,
                            "hista_states": base64.b64encode(pack_vectors(v, "float32")).decode(),
                            "num_hista_states": len(v),
                        }
                        for r, v in zip(group.rollouts, states.rollouts, strict=True)
                    ],
                }
            ],
        }
        answer = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        for rollout, theirs in zip(answer.json()["groups"][0]["rollouts"], expected, strict=True):
            np.testing.assert_allclose(rollout["values"]["hista"], theirs, rtol=0, atol=1e-5)
        body["params"] = {"hista": {**HISTA, "stride": 4}}
        refused_http = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=60)
        assert refused_http.status_code == 400
        assert "hista_states.stride" in refused_http.text


@pytest.mark.slow
def test_serve_backend_none_starts_without_weights(
    start_serve: Callable[..., Serve], group: Group
) -> None:
    process, grpc_port, http_port, log = start_serve("--backend", "none", "--model", "embedded")
    wait_for(lambda: serve_ready(process, http_port), 300, "serve --backend none ready")
    info = httpx.get(f"http://127.0.0.1:{http_port}/v1/model", timeout=10).json()
    assert info["backend"] == "none"
    with ValueClient(f"127.0.0.1:{grpc_port}") as client:
        result = client.estimate([group], ("numca", "group_mean"))
    assert len(result.groups[0].rollouts) == len(RESPONSES)
    assert "de-quantizing" not in log.read_text()
