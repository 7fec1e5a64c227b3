"""Authenticated weight reloads over gRPC and HTTP, with requests in flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import EstimateResult, Group, ReloadFailed, Rollout, ValueClient
from tests.servers import ServerThread, metric_samples, running_server

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def updated_checkpoint(embedded_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded checkpoint with its final norm scaled: a visibly different policy."""
    directory = tmp_path_factory.mktemp("updated")
    weights = load_file(str(embedded_checkpoint / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(directory / "model.safetensors"))
    return directory


@pytest.fixture
def server(embedded_checkpoint: Path) -> Iterator[ServerThread]:
    # Reloads change the weights, so this server gets a model of its own.
    backend = TorchBackend(str(embedded_checkpoint), device="cpu")
    with running_server(backend, admin_token=TOKEN) as running:
        yield running


def group(length: int = 60) -> Group:
    rng = np.random.default_rng(7)
    return Group(
        prompt_ids=rng.integers(100, 40000, 20),
        rollouts=[Rollout(rng.integers(100, 40000, length), float(i % 2)) for i in range(4)],
    )


PARAMS = {"hista": {"node_spacing": 10, "d_min": 0.5}}


def test_reload_changes_the_model_version_and_values(
    server: ServerThread, updated_checkpoint: Path
) -> None:
    with ValueClient(server.grpc_target, retries=0) as client:
        before = client.estimate([group()], ("hista",), **PARAMS)
        assert before.model.revision == 0
        info = client.reload_weights(str(updated_checkpoint), admin_token=TOKEN, version="step-1")
        assert (info.version, info.revision) == ("step-1", 1)
        after = client.estimate([group()], ("hista",), **PARAMS)
    assert (after.model.version, after.model.revision) == ("step-1", 1)
    assert client_model_info(server)["revision"] == 1
    old = before.groups[0].rollouts[0].values["hista"]
    new = after.groups[0].rollouts[0].values["hista"]
    assert old.shape == new.shape and not np.allclose(old, new)


def client_model_info(server: ServerThread) -> dict[str, object]:
    return httpx.get(f"{server.http_url}/v1/model", timeout=10).json()


def test_reload_needs_the_admin_token(server: ServerThread, updated_checkpoint: Path) -> None:
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_weights(str(updated_checkpoint), admin_token="wrong")
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    url = f"{server.http_url}/v1/admin/reload"
    body = {"checkpoint": str(updated_checkpoint)}
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    assert answer.status_code == 200 and answer.json()["revision"] == 1


def test_bad_checkpoint_is_refused(server: ServerThread, tmp_path: Path) -> None:
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_weights(str(tmp_path), admin_token=TOKEN)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "safetensors" in caught.value.details()
        wrong = tmp_path / "wrong"
        wrong.mkdir()
        save_file({"model.norm.weight": torch.ones(3)}, str(wrong / "model.safetensors"))
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_weights(str(wrong), admin_token=TOKEN)
        assert "shape" in caught.value.details() or "missing" in caught.value.details()
        assert client.model_info().revision == 0


def test_a_corrupt_checkpoint_gets_the_same_mapped_error_on_both_front_ends(
    server: ServerThread, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file" * 64)
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.reload_weights(str(corrupt), admin_token=TOKEN)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = f"{corrupt / 'model.safetensors'}: not a readable safetensors file"
    assert f"INVALID_ARGUMENT: checkpoint: {message} (" in caught.value.details()
    answer = httpx.post(
        f"{server.http_url}/v1/admin/reload",
        json={"checkpoint": str(corrupt)},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    )
    assert answer.status_code == 400
    detail = answer.json()["detail"]
    assert detail["field"] == "checkpoint" and detail["message"].startswith(message)
    page = server.metrics()
    assert metric_samples(page, "statevalue_requests_total") == {
        '{frontend="grpc",rpc="ReloadWeights",status="INVALID_ARGUMENT"}': 1.0,
        '{frontend="http",rpc="reload",status="400"}': 1.0,
    }
    assert client_model_info(server)["revision"] == 0


def test_min_model_revision(server: ServerThread, updated_checkpoint: Path) -> None:
    with ValueClient(server.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([group()], ("group_mean",), min_model_revision=1)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        body = {
            "methods": ["group_mean"],
            "min_model_revision": 1,
            "groups": [{"prompt_ids": [1, 2], "rollouts": [{"response_ids": [3], "reward": 1}]}],
        }
        answer = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=30)
        assert (
            answer.status_code == 409 and answer.json()["detail"]["field"] == "min_model_revision"
        )
        client.reload_weights(str(updated_checkpoint), admin_token=TOKEN)
        result = client.estimate([group()], ("group_mean",), min_model_revision=1)
        assert result.model.revision == 1


def test_requests_in_flight_survive_a_reload(
    server: ServerThread, updated_checkpoint: Path
) -> None:
    results: list[EstimateResult] = []
    with ValueClient(server.grpc_target, retries=0) as client:
        workers = [
            threading.Thread(
                target=lambda: results.append(client.estimate([group(200)], ("hista",), **PARAMS))
            )
            for _ in range(4)
        ]
        for worker in workers:
            worker.start()
        client.reload_weights(str(updated_checkpoint), admin_token=TOKEN)
        for worker in workers:
            worker.join(120)
    assert len(results) == 4
    for result in results:
        assert result.model.revision in (0, 1)
        assert all(len(r.values["hista"]) == 200 for r in result.groups[0].rollouts)


def test_reload_reaches_every_replica(embedded_checkpoint: Path, updated_checkpoint: Path) -> None:
    # One model per replica: a reload through each must change each one once.
    backends = [TorchBackend(str(embedded_checkpoint), device="cpu") for _ in range(3)]
    with (
        running_server(backends[0], admin_token=TOKEN) as one,
        running_server(backends[1], admin_token=TOKEN) as two,
        running_server(backends[2], admin_token="another") as other,
    ):
        target = f"ipv4:{one.grpc_target},{two.grpc_target}"
        with ValueClient(target, retries=0) as client:
            reloaded = client.reload_weights(
                str(updated_checkpoint), admin_token=TOKEN, version="step-1"
            )
            assert set(reloaded.replicas) == {one.grpc_target, two.grpc_target}
            for info in reloaded.replicas.values():
                assert (info.version, info.revision) == ("step-1", 1)
            assert (reloaded.version, reloaded.revision) == ("step-1", 1)
            for replica in (one, two):
                assert client_model_info(replica)["revision"] == 1
            # Every replica now answers requests that need the new weights.
            for _ in range(4):
                result = client.estimate([group()], ("group_mean",), min_model_revision=1)
                assert result.model.version == "step-1"
        # A replica that refuses is named, and the others' reloads are reported.
        mixed = f"ipv4:{one.grpc_target},{other.grpc_target}"
        with ValueClient(mixed, retries=0) as client:
            with pytest.raises(ReloadFailed) as caught:
                client.reload_weights(str(updated_checkpoint), admin_token=TOKEN)
        failure = caught.value
        assert set(failure.errors) == {other.grpc_target}
        assert failure.code() == grpc.StatusCode.UNAUTHENTICATED
        assert other.grpc_target in str(failure)
        assert failure.reloaded[one.grpc_target].revision == 2
        assert client_model_info(other)["revision"] == 0
