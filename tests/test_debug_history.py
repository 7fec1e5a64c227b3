"""The debug history (``--debug-history N``): the last N answered Estimates from either
front end, off by default, behind the API token when one is set."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.debug_history import DebugHistory
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import ServerThread, running_server

TOKEN = "history-token-5d21"


def body(group_id: str, explain: bool = False) -> dict[str, Any]:
    # group_mean only: no forward pass, so the test is about the history, not the model.
    return {
        "methods": ["group_mean"],
        "explain": explain,
        "groups": [
            {
                "group_id": group_id,
                "prompt_ids": [1, 2, 3],
                "rollouts": [
                    {"response_ids": [4, 5, 6], "reward": 1.0},
                    {"response_ids": [7, 8], "reward": 0.0},
                ],
            }
        ],
    }


def estimate(server: ServerThread, group_id: str, **headers: str) -> dict[str, Any]:
    response = httpx.post(
        f"{server.http_url}/v1/estimate", json=body(group_id), headers=headers, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def get(server: ServerThread, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{server.http_url}/v1/debug/history{path}", headers=headers, timeout=30)


def test_off_by_default(backend: TorchBackend) -> None:
    with running_server(backend) as server:
        estimate(server, "g")
        for path in ("", "/1"):
            response = get(server, path)
            assert response.status_code == 404
            assert "--debug-history" in response.json()["detail"]["message"]


def test_keeps_the_last_n_from_both_front_ends(backend: TorchBackend) -> None:
    with running_server(backend, debug_history=2) as server:
        first = estimate(server, "first")
        assert "explanation" not in first["groups"][0]["rollouts"][0]
        estimate(server, "second")
        with ValueClient(server.grpc_target) as client:
            client.estimate(
                [Group([1, 2, 3], [Rollout([4, 5], 1.0), Rollout([6], 0.0)], group_id="grpc")],
                methods=("group_mean",),
            )
        listed = get(server, "").json()
        assert [item["id"] for item in listed] == [3, 2]  # newest first; #1 dropped
        assert listed[0]["groups"] == 1 and listed[0]["rollouts"] == 2
        assert listed[0]["methods"] == ["group_mean"]
        assert listed[0]["model"]["name"] == backend.identity.name
        assert get(server, "/1").status_code == 404
        assert get(server, "/99").status_code == 404

        kept = get(server, "/2").json()
        assert kept["request"]["groups"][0]["group_id"] == "second"
        # The kept request is the JSON POST /v1/estimate takes: it can be sent again.
        again = httpx.post(f"{server.http_url}/v1/estimate", json=kept["request"], timeout=60)
        assert again.status_code == 200, again.text
        rollout = kept["response"]["groups"][0]["rollouts"][0]
        assert rollout["values"] == {"group_mean": [0.5, 0.5, 0.5]}
        # Kept answers are explained, whatever the caller asked for.
        assert len(rollout["explanation"]["tokens"]) == 3

        assert [item["id"] for item in get(server, "").json()] == [4, 3]
        from_grpc = get(server, "/3").json()
        assert from_grpc["request"]["groups"][0]["group_id"] == "grpc"
        assert from_grpc["request"]["groups"][0]["prompt_ids"] == [1, 2, 3]
        assert from_grpc["request"]["groups"][0]["rollouts"][1] == {
            "response_ids": [6],
            "reward": 0.0,
            "num_hista_states": 0,  # no trainer-side Hista states were sent
        }


def test_needs_the_api_token_when_one_is_set(backend: TorchBackend) -> None:
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running_server(backend, debug_history=4, api_token=TOKEN) as server:
        estimate(server, "g", **auth)
        for path in ("", "/1"):
            assert get(server, path).status_code == 401
            assert get(server, path, authorization="Bearer wrong").status_code == 401
            assert get(server, path, **auth).status_code == 200
        assert TOKEN not in get(server, "/1", **auth).text


def test_the_ring_buffer_drops_the_oldest_first() -> None:
    with pytest.raises(ValueError):
        DebugHistory(0)
    history = DebugHistory(3)
    entries = [history.record(object(), object()) for _ in range(5)]  # type: ignore[arg-type]
    assert [e.id for e in history.entries()] == [5, 4, 3]
    assert history.get(2) is None
    assert history.get(4) is entries[3]
