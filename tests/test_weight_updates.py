"""Weight updates from the trainer's memory over gloo: two real replicas, a real trainer
model, parity with a disk reload, refusals before any byte moves, a trainer killed midway."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import AsyncValueClient, Group, ReloadFailed, Rollout, ValueClient
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.sync import WeightSync
from statevalue_client.weights import (
    SEGMENT_PREFIX,
    SHARED_MEMORY_DIR,
    TensorSpec,
    choose_transport,
    create_segment,
    host_identity,
    named_tensor_list,
    plan_buckets,
)
from tests.servers import ServerThread, metric_samples, running_server, wait_for

TOKEN = "s3cret"
# Small buckets, so an update of the embedded model takes many broadcasts: buckets packed
# with several tensors, and the embedding (113 MB) alone in one of its own.
BUCKET_BYTES = 16 << 20
SEQUENCES = [np.arange(1, 70, dtype=np.int32), np.arange(500, 531, dtype=np.int32)]
PARAMS = {"hista": {"node_spacing": 10, "d_min": 0.5}}


@pytest.fixture(scope="module")
def replica_backends(embedded_checkpoint: Path) -> list[TorchBackend]:
    # Updates change the weights, so these replicas get models of their own.
    return [TorchBackend(str(embedded_checkpoint), device="cpu") for _ in range(2)]


@pytest.fixture(scope="module")
def replicas(replica_backends: list[TorchBackend]) -> Iterator[list[ServerThread]]:
    with (
        running_server(replica_backends[0], admin_token=TOKEN) as one,
        running_server(replica_backends[1], admin_token=TOKEN) as two,
    ):
        yield [one, two]


@pytest.fixture(scope="module")
def trainer(embedded_checkpoint: Path) -> torch.nn.Module:
    """The trainer's policy: a plain transformers model of the same checkpoint."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(embedded_checkpoint).eval()


def target(replicas: list[ServerThread]) -> str:
    return "ipv4:" + ",".join(replica.grpc_target for replica in replicas)


def take_a_step(model: torch.nn.Module, seed: int) -> None:
    """Move every weight a little, as an optimizer step would (the final norm visibly)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.add_(noise * 1e-3 * parameter.abs().mean())
        model.model.norm.weight.mul_(1.25)


def revisions(replicas: list[ServerThread]) -> list[int]:
    return [replica.server.model_info()["revision"] for replica in replicas]


def received(replica: ServerThread, transport: str | None = None) -> float:
    """Bytes of weights the replica received from memory, by one transport or all."""
    samples = metric_samples(replica.metrics(), "statevalue_weight_update_bytes_total")
    if transport is None:
        return sum(samples.values())
    return samples.get(f'{{transport="{transport}"}}', 0.0)


def save_checkpoint(model: torch.nn.Module, embedded_checkpoint: Path, directory: Path) -> None:
    """``model`` as a checkpoint directory a replica loads (with the tokenizer)."""
    model.save_pretrained(directory)
    for file in embedded_checkpoint.iterdir():
        if not (directory / file.name).exists():
            shutil.copy(file, directory)


def states(backend: TorchBackend) -> list[torch.Tensor]:
    return [s.clone() for s in backend.hidden_states(SEQUENCES)]


def group() -> Group:
    rng = np.random.default_rng(3)
    return Group(
        prompt_ids=rng.integers(100, 40000, 12),
        rollouts=[Rollout(rng.integers(100, 40000, 40), float(i % 2)) for i in range(4)],
    )


def test_buckets_pack_tensors_in_order_and_a_large_one_alone() -> None:
    specs = [
        TensorSpec("a", (3,), torch.float32),
        TensorSpec("b", (10,), torch.bfloat16),
        TensorSpec("big", (100,), torch.float32),
        TensorSpec("c", (), torch.float32),
    ]
    buckets = plan_buckets(specs, 128)
    assert [[p.spec.name for p in b.tensors] for b in buckets] == [["a", "b"], ["big"], ["c"]]
    # Each tensor starts aligned, so it can be viewed in its dtype where it lies.
    assert [p.offset for p in buckets[0].tensors] == [0, 64]
    assert [b.nbytes for b in buckets] == [84, 400, 4]


def test_an_update_over_gloo_equals_a_disk_reload_of_the_same_weights(
    replicas: list[ServerThread],
    replica_backends: list[TorchBackend],
    trainer: torch.nn.Module,
    embedded_checkpoint: Path,
    tmp_path: Path,
) -> None:
    before = revisions(replicas)
    old = states(replica_backends[0])
    take_a_step(trainer, seed=1)
    with ValueClient(target(replicas), retries=0) as client:
        # The trainer's full (gathered) state dict, tied output embedding included.
        result = client.update_weights(
            trainer.state_dict(),
            admin_token=TOKEN,
            version="step-1",
            transport="distributed",
            bucket_bytes=BUCKET_BYTES,
        )
    assert set(result.replicas) == {replica.grpc_target for replica in replicas}
    assert result.version == "step-1"
    assert revisions(replicas) == [r + 1 for r in before]
    save_checkpoint(trainer, embedded_checkpoint, tmp_path)
    from_disk = TorchBackend(str(tmp_path), device="cpu")
    expected = states(from_disk)
    for backend in replica_backends:
        for got, want, was in zip(states(backend), expected, old, strict=True):
            assert torch.equal(got, want)
            assert not torch.allclose(got, was)
    with running_server(from_disk) as reference:
        with ValueClient(reference.grpc_target, retries=0) as client:
            want_values = client.estimate([group()], ("hista",), **PARAMS)
        for replica, revision in zip(replicas, before, strict=True):
            with ValueClient(replica.grpc_target, retries=0) as client:
                got_values = client.estimate(
                    [group()], ("hista",), min_model_revision=revision + 1, **PARAMS
                )
            assert got_values.model.version == "step-1"
            for got, want in zip(
                got_values.groups[0].rollouts, want_values.groups[0].rollouts, strict=True
            ):
                assert np.array_equal(got.values["hista"], want.values["hista"])


def test_the_async_client_reuses_the_group_and_sends_any_float_dtype(
    replicas: list[ServerThread], replica_backends: list[TorchBackend], trainer: torch.nn.Module
) -> None:
    before = revisions(replicas)

    async def two_updates() -> list[int]:
        async with AsyncValueClient(target(replicas), retries=0) as client:
            found = []
            for step, wire in ((2, torch.float32), (3, torch.bfloat16)):
                take_a_step(trainer, seed=step)
                with torch.no_grad():
                    for parameter in trainer.parameters():
                        # Weights a bfloat16 copy holds exactly, so either wire gives them.
                        parameter.copy_(parameter.to(torch.bfloat16))
                # bfloat16 on the wire: each replica casts to its model's float32.
                tensors = {name: p.to(wire) for name, p in trainer.named_parameters()}
                result = await client.update_weights(
                    tensors, admin_token=TOKEN, version=f"step-{step}", transport="distributed"
                )
                found.append(result.revision)
                with ValueClient(target(replicas), retries=0) as blocking:
                    # Every replica answers requests that need the new weights.
                    for _ in range(4):
                        answer = blocking.estimate(
                            [group()], ("group_mean",), min_model_revision=result.revision
                        )
                        assert answer.model.version == f"step-{step}"
            return found

    assert asyncio.run(two_updates()) == [before[0] + 1, before[0] + 2]
    ids = torch.from_numpy(SEQUENCES[0].astype(np.int64))[None]
    with torch.no_grad():
        want = trainer.model(ids).last_hidden_state[0]
    for backend in replica_backends:
        torch.testing.assert_close(states(backend)[0], want, rtol=1e-5, atol=1e-5)


def test_tensors_that_do_not_fit_are_refused_before_any_byte_moves(
    replicas: list[ServerThread], replica_backends: list[TorchBackend], trainer: torch.nn.Module
) -> None:
    before = revisions(replicas)
    old = states(replica_backends[0])
    received_before = [received(r) for r in replicas]
    good = trainer.state_dict()
    wrong_shape = {**good, "model.norm.weight": torch.ones(3)}
    unknown = {**good, "model.extra.weight": torch.ones(3)}
    missing = {k: v for k, v in good.items() if k != "model.layers.3.mlp.up_proj.weight"}
    with ValueClient(target(replicas), retries=0) as client:
        for tensors, named in (
            (wrong_shape, "model.norm.weight has shape (3,)"),
            (unknown, "model.extra.weight"),
            (missing, "model.layers.3.mlp.up_proj.weight"),
        ):
            with pytest.raises(ReloadFailed) as caught:
                client.update_weights(tensors, admin_token=TOKEN, transport="distributed")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for replica in replicas:
                assert named in str(caught.value.errors[replica.grpc_target])
    # One replica refuses (another admin token): the other is told to stand down.
    with running_server(replica_backends[0], admin_token="another") as stranger:
        with ValueClient(f"ipv4:{replicas[1].grpc_target},{stranger.grpc_target}") as client:
            with pytest.raises(ReloadFailed) as caught:
                client.update_weights(good, admin_token=TOKEN, transport="distributed")
    errors = caught.value.errors
    assert errors[stranger.grpc_target].code() == grpc.StatusCode.UNAUTHENTICATED
    assert errors[replicas[1].grpc_target].code() == grpc.StatusCode.ABORTED
    assert "before sending anything" in errors[replicas[1].grpc_target].details()
    assert revisions(replicas) == before
    assert [received(r) for r in replicas] == received_before
    for got, was in zip(states(replica_backends[0]), old, strict=True):
        assert torch.equal(got, was)


def test_an_announcement_that_makes_no_sense_is_refused_naming_the_field(
    replicas: list[ServerThread], trainer: torch.nn.Module
) -> None:
    tensors = [
        pb.TensorSpec(name=name, shape=tensor.shape, dtype="float32")
        for name, tensor in trainer.state_dict().items()
    ]
    good = {
        "rendezvous": "127.0.0.1:1",
        "group": "g",
        "world_size": 2,
        "rank": 1,
        "backend": "gloo",
        "tensors": tensors,
        "bucket_bytes": 1 << 20,
        "update": 1,
    }
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(replicas[0].grpc_target) as channel:
        stub = pb_grpc.ValueServiceStub(channel)
        for change, field in (
            ({"rendezvous": "nowhere"}, "rendezvous"),
            ({"rank": 2}, "rank"),
            ({"backend": "mpi"}, "backend"),
            ({"tensors": [pb.TensorSpec(name="x", shape=[1], dtype="int8")]}, "tensors[0].dtype"),
            ({"backend": "nccl"}, "backend"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.UpdateWeights(
                    pb.UpdateWeightsRequest(**{**good, **change}), metadata=metadata, timeout=30
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(f"{field}: ")


def test_auto_picks_shared_memory_for_replicas_on_this_machine_only() -> None:
    here = ["127.0.0.1:50051", "[::1]:50051", "localhost:1"]
    assert choose_transport("auto", here, 1 << 20) == "shared_memory"
    # A documentation address (no host has it) and a name that does not resolve.
    assert choose_transport("auto", [*here, "192.0.2.1:50051"], 1 << 20) == "distributed"
    assert choose_transport("auto", ["no-such-host.invalid:1"], 1 << 20) == "distributed"
    # More than the shared memory holds.
    assert choose_transport("auto", here, 1 << 60) == "distributed"
    assert choose_transport("distributed", here, 1 << 20) == "distributed"
    with pytest.raises(ValueError, match="transport"):
        choose_transport("nvlink", here, 1 << 20)
    # Asked for explicitly, an update larger than the shared memory is refused before any
    # byte is written.
    too_large = SHARED_MEMORY_DIR / f"{SEGMENT_PREFIX}{uuid.uuid4().hex}"
    with pytest.raises(OSError, match="bytes free") as caught:
        create_segment(too_large, 1 << 60)
    assert "transport='distributed'" in str(caught.value)
    assert not too_large.exists()


def test_a_shared_memory_update_equals_a_disk_reload_of_the_same_weights(
    replicas: list[ServerThread],
    replica_backends: list[TorchBackend],
    trainer: torch.nn.Module,
    embedded_checkpoint: Path,
    tmp_path: Path,
) -> None:
    before = revisions(replicas)
    old = states(replica_backends[1])
    take_a_step(trainer, seed=5)
    save_checkpoint(trainer, embedded_checkpoint, tmp_path)
    with ValueClient(replicas[0].grpc_target, retries=0) as client:
        client.reload_weights(str(tmp_path), admin_token=TOKEN)
    shared = received(replicas[1], "shared_memory")
    # A loopback address: "auto" sends through shared memory.
    with ValueClient(replicas[1].grpc_target, retries=0) as client:
        result = client.update_weights(trainer.state_dict(), admin_token=TOKEN, version="step-5")
        assert client._weights is not None
        segments = list(SHARED_MEMORY_DIR.glob(f"{SEGMENT_PREFIX}{client._weights.group_id}*"))
    assert result.version == "step-5"
    assert revisions(replicas) == [r + 1 for r in before]
    nbytes = sum(t.nbytes for _, t in named_tensor_list(trainer.state_dict()))
    assert received(replicas[1], "shared_memory") - shared == nbytes
    assert segments == []  # removed once the replica answered
    for got, want, was in zip(
        states(replica_backends[1]), states(replica_backends[0]), old, strict=True
    ):
        assert torch.equal(got, want)
        assert not torch.allclose(got, was)


def test_a_shared_memory_update_that_cannot_work_is_refused_and_the_old_weights_serve(
    replicas: list[ServerThread], replica_backends: list[TorchBackend], trainer: torch.nn.Module
) -> None:
    replica = replicas[0]
    before = revisions(replicas)
    old = states(replica_backends[0])
    bytes_before = received(replica)
    good = trainer.state_dict()
    tensors = [
        pb.TensorSpec(name=name, shape=tensor.shape, dtype="float32")
        for name, tensor in named_tensor_list(good)
    ]
    nbytes = 600 << 20
    # A real segment, too short for the tensors it claims to hold.
    short = SHARED_MEMORY_DIR / f"{SEGMENT_PREFIX}{uuid.uuid4().hex}"
    short.write_bytes(b"\0" * 4096)
    segment = {"name": f"{SEGMENT_PREFIX}0123abcd", "nbytes": nbytes, "host": host_identity()}
    wrong_shape = [*tensors[:-1], pb.TensorSpec(name=tensors[-1].name, shape=[3], dtype="float32")]
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    try:
        with grpc.insecure_channel(replica.grpc_target) as channel:
            stub = pb_grpc.ValueServiceStub(channel)
            for change, segment_change, code, starts in (
                # Names and shapes are checked first: the segment (there is none) is never
                # looked for.
                ({"tensors": wrong_shape}, {}, "INVALID_ARGUMENT", "tensors: "),
                ({}, {"name": "../etc/passwd"}, "INVALID_ARGUMENT", "shared_memory.name: "),
                ({}, {"nbytes": 10}, "INVALID_ARGUMENT", "shared_memory.nbytes: "),
                ({"rendezvous": "127.0.0.1:1"}, {}, "INVALID_ARGUMENT", "rendezvous: "),
                ({}, {"host": "another-host"}, "FAILED_PRECONDITION", "shared_memory: "),
                ({}, {}, "FAILED_PRECONDITION", "shared_memory: segment"),
                ({}, {"name": short.name}, "ABORTED", f"segment {short.name} holds 4096"),
            ):
                request = pb.UpdateWeightsRequest(
                    group="g",
                    update=1,
                    shared_memory=pb.SharedMemorySegment(**{**segment, **segment_change}),
                    **{"tensors": tensors, **change},
                )
                with pytest.raises(grpc.RpcError) as caught:
                    stub.UpdateWeights(request, metadata=metadata, timeout=30)
                assert caught.value.code().name == code, caught.value.details()
                assert caught.value.details().startswith(starts), caught.value.details()
    finally:
        short.unlink()
    with ValueClient(replica.grpc_target, retries=0) as client:
        with pytest.raises(ReloadFailed) as refused:
            client.update_weights(
                {**good, "model.norm.weight": torch.ones(3)},
                admin_token=TOKEN,
                transport="shared_memory",
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "model.norm.weight has shape (3,)" in str(refused.value)
        assert client._weights is not None
        assert not list(SHARED_MEMORY_DIR.glob(f"{SEGMENT_PREFIX}{client._weights.group_id}*"))
        # The old weights keep serving.
        answer = client.estimate([group()], ("group_mean",), min_model_revision=before[0])
    assert answer.model.revision == before[0]
    assert revisions(replicas) == before
    assert received(replica) == bytes_before
    for got, was in zip(states(replica_backends[0]), old, strict=True):
        assert torch.equal(got, was)


def test_the_weight_sync_sends_every_sync_every_steps_and_every_replica_holds_the_revision(
    replicas: list[ServerThread], replica_backends: list[TorchBackend], trainer: torch.nn.Module
) -> None:
    before = revisions(replicas)
    with ValueClient(target(replicas), retries=0) as client:
        sync = WeightSync(client, admin_token=TOKEN, sync_every=2)
        try:
            assert sync.revision() == 0  # nothing synced yet: no requirement
            take_a_step(trainer, seed=6)
            assert not sync.step_done(1, trainer.state_dict)
            take_a_step(trainer, seed=7)
            assert sync.step_done(2, trainer.state_dict)
            revision = sync.revision()  # waits for the sync in flight
        finally:
            sync.close()
        assert revisions(replicas) == [r + 1 for r in before]
        assert revision == min(before) + 1
        # Requests round-robin over both replicas: each answers at the synced revision.
        for _ in range(4):
            answer = client.estimate([group()], ("group_mean",), min_model_revision=revision)
            assert answer.model.version == "step-2"
    for replica in replicas:
        with ValueClient(replica.grpc_target, retries=0) as client:
            with pytest.raises(grpc.RpcError) as refused:
                client.estimate([group()], ("group_mean",), min_model_revision=revision + 1)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    ids = torch.from_numpy(SEQUENCES[0].astype(np.int64))[None]
    with torch.no_grad():
        want = trainer.model(ids).last_hidden_state[0]
    for backend in replica_backends:
        torch.testing.assert_close(states(backend)[0], want, rtol=1e-5, atol=1e-5)


TRAINER_KILLED_MIDWAY = """
import os, sys, torch
from safetensors.torch import load_file
from statevalue_client import ValueClient

class DiesWhenSent(torch.Tensor):
    # The trainer process dies the moment this tensor is packed for sending.
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.reshape:
            print("dying", flush=True)
            os._exit(3)
        return super().__torch_function__(func, types, args, kwargs or {})

weights = load_file(sys.argv[2])
weights = {name: tensor * 1.01 for name, tensor in weights.items()}
weights["model.layers.20.mlp.up_proj.weight"] = weights[
    "model.layers.20.mlp.up_proj.weight"
].as_subclass(DiesWhenSent)
with ValueClient(sys.argv[1], retries=0, timeout=60) as client:
    client.update_weights(
        weights, admin_token=sys.argv[3], transport="distributed", bucket_bytes=8 << 20
    )
"""


@pytest.mark.slow
def test_a_trainer_killed_midway_leaves_every_replica_on_its_old_weights(
    replicas: list[ServerThread],
    replica_backends: list[TorchBackend],
    trainer: torch.nn.Module,
    embedded_checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = revisions(replicas)
    old = [states(backend) for backend in replica_backends]
    with caplog.at_level(logging.WARNING, logger="statevalue.server"):
        finished = subprocess.run(
            [
                sys.executable,
                "-c",
                textwrap.dedent(TRAINER_KILLED_MIDWAY),
                target(replicas),
                str(embedded_checkpoint / "model.safetensors"),
                TOKEN,
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert finished.returncode == 3, finished.stderr

        def broken() -> list[str]:
            return [r.getMessage() for r in caplog.records if "transfer broke" in r.getMessage()]

        # Each replica gives up on the broken transfer by itself, at the latest when the
        # update's timeout (60 s) passes; wait until both have.
        wait_for(
            lambda: len(broken()) == 2, timeout=240, what="both replicas to give up the transfer"
        )
    # Part of the weights had arrived when the trainer died.
    assert not any("broke after 0 of" in message for message in broken())
    assert revisions(replicas) == before
    for backend, was in zip(replica_backends, old, strict=True):
        for got, want in zip(states(backend), was, strict=True):
            assert torch.equal(got, want)
    # The next trainer builds a new group and gets through.
    take_a_step(trainer, seed=4)
    with ValueClient(target(replicas), retries=0) as client:
        result = client.update_weights(
            trainer.state_dict(), admin_token=TOKEN, transport="distributed"
        )
        assert result.revision == before[0] + 1
