"""``explain``: why each rollout got its values, over HTTP and gRPC, from the same engine."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from tests.conftest import APPLES
from tests.servers import ServerThread, running_server

RESPONSES = [
    ("5 + 3 = 8. The answer is 8.", 1.0),
    ("12 - 9 = 3. The answer is 3.", 0.0),
    ("He had 5, then 3 more: 5 + 3 = 8 apples. Answer: 8", 1.0),
    ("5 + 3 = 7, I think", None),  # a query: valued, never a neighbour
]
# Small node spacing and merge distance, so these short responses have Hista nodes and
# one Numca state per number.
PARAMS = {"hista": {"node_spacing": 4}, "numca": {"merge_distance": 1}}


def body(explain: bool) -> dict[str, Any]:
    return {
        "methods": ["numca", "hista", "group_mean"],
        "params": PARAMS,
        "explain": explain,
        "groups": [
            {
                "group_id": "apples",
                "messages": [{"role": "user", "content": APPLES}],
                "rollouts": [
                    {"response_text": text, **({} if reward is None else {"reward": reward})}
                    for text, reward in RESPONSES
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    # Micro-batches sized by tokens, not by the measured speed: every call runs the same
    # forward pass, so two answers compare bit for bit however loaded the machine is.
    with running_server(backend, micro_batch_seconds=1e9) as server:
        yield server


@pytest.fixture(scope="module")
def explained(server: ServerThread) -> dict[str, Any]:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=body(True), timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_tokens_are_the_response_text_token_by_token(explained: dict[str, Any]) -> None:
    for (text, _), rollout in zip(RESPONSES, explained["groups"][0]["rollouts"], strict=True):
        tokens = rollout["explanation"]["tokens"]
        assert "".join(tokens) == text
        assert len(tokens) == len(rollout["values"]["numca"]) > 1


def test_numca_states_are_the_number_sets_of_each_segment(explained: dict[str, Any]) -> None:
    rollouts = explained["groups"][0]["rollouts"]
    for rollout in rollouts:
        explanation = rollout["explanation"]
        assert len(explanation["numca_states"]) == len(rollout["boundaries"]["numca"])
    # The last number (the answer) is no milestone; sets come in numeric order.
    assert rollouts[0]["explanation"]["numca_states"] == [[], ["5"], ["3", "5"], ["3", "5", "8"]]
    assert rollouts[1]["explanation"]["numca_states"] == [[], ["12"], ["9", "12"], ["3", "9", "12"]]


def test_hista_nodes_carry_their_neighbours_and_weights(explained: dict[str, Any]) -> None:
    group = explained["groups"][0]
    rewards = [reward for _, reward in RESPONSES]
    lengths = [len(r["values"]["hista"]) for r in group["rollouts"]]
    seen = 0
    for i, rollout in enumerate(group["rollouts"]):
        nodes = rollout["explanation"]["hista_nodes"]
        boundaries = rollout["boundaries"]["hista"]
        # Segments start at 0 (group mean), at every interior node and, for a rewarded
        # rollout, at its last token (the end node, valued at its reward).
        end = [lengths[i] - 1] if rewards[i] is not None else []
        assert boundaries == [0, *[n["token"] for n in nodes], *end]
        for node in nodes:
            neighbours = node["neighbours"]
            assert neighbours, node
            assert math.isclose(sum(n["weight"] for n in neighbours), 1.0, abs_tol=1e-9)
            assert all(n["weight"] > 0 for n in neighbours)
            distances = [n["distance"] for n in neighbours]
            assert distances == sorted(distances)
            assert all(rewards[n["rollout"]] is not None for n in neighbours)
            assert all(0 <= n["token"] <= lengths[n["rollout"]] for n in neighbours)
            value = sum(n["weight"] * rewards[n["rollout"]] for n in neighbours)
            assert rollout["values"]["hista"][node["token"]] == pytest.approx(value, abs=1e-5)
            seen += 1
    assert seen >= 8


def test_without_explain_the_answer_has_none_and_the_same_numbers(
    server: ServerThread, explained: dict[str, Any]
) -> None:
    response = httpx.post(f"{server.http_url}/v1/estimate", json=body(False), timeout=120)
    assert response.status_code == 200, response.text
    plain = response.json()
    for rollout, with_explanation in zip(
        plain["groups"][0]["rollouts"], explained["groups"][0]["rollouts"], strict=True
    ):
        assert "explanation" not in rollout
        assert rollout == {k: v for k, v in with_explanation.items() if k != "explanation"}


def test_grpc_explains_the_same(server: ServerThread, explained: dict[str, Any]) -> None:
    params = pb.EstimatorParams()
    params.hista.node_spacing = PARAMS["hista"]["node_spacing"]
    params.numca.merge_distance = PARAMS["numca"]["merge_distance"]
    group = pb.Group(
        group_id="apples",
        messages=[pb.ChatMessage(role="user", content=APPLES)],
        rollouts=[pb.Rollout(response_text=text, reward=reward) for text, reward in RESPONSES],
    )
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.ValueServiceStub(channel)
        answer = stub.Estimate(
            pb.EstimateRequest(groups=[group], params=params, explain=True), timeout=120
        )
        plain = stub.Estimate(pb.EstimateRequest(groups=[group], params=params), timeout=120)
    expected_rollouts = explained["groups"][0]["rollouts"]
    for out, rollout in zip(answer.groups[0].rollouts, expected_rollouts, strict=True):
        expected = rollout["explanation"]
        assert list(out.explanation.tokens) == expected["tokens"]
        assert [list(s.numbers) for s in out.explanation.numca_states] == expected["numca_states"]
        assert [
            [(n.rollout, n.token, n.weight) for n in node.neighbours]
            for node in out.explanation.hista_nodes
        ] == [
            [(n["rollout"], n["token"], pytest.approx(n["weight"])) for n in node["neighbours"]]
            for node in expected["hista_nodes"]
        ]
    assert not any(r.HasField("explanation") for r in plain.groups[0].rollouts)
