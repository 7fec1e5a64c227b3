"""The vLLM backend against the torch backend, on the embedded model's real rollouts.

vLLM cannot share an environment with the rest of the test stack (it pins an older
transformers), so ``make test`` runs this module in a second virtualenv (``.venv-vllm``)
after the main suite; elsewhere it is skipped.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from statevalue.backends.base import CheckpointRefused, LoadedWeights, WeightLoadFailed
from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput
from statevalue_client import Group, ReloadFailed, Rollout, ValueClient
from tests.conftest import import_or_skip
from tests.parity import assert_hista_agrees
from tests.servers import running_server, serve_ready, start_serve_process, wait_for

import_or_skip("vllm")

from statevalue.backends.vllm_backend import VllmBackend  # noqa: E402

pytestmark = pytest.mark.vllm

# Float32 on both sides, other kernels and summation orders; vector norms are about 50.
STATE_ATOL = 2e-3
# Hista's values are inverse-distance weighted rewards in [0, 1].
VALUE_ATOL = 1e-3
# Hista's prefix distances between the backends, relative (absolute below 1): compared at
# the served defaults, where a neighbour within this of the k-th distance may flip
# (tests/parity.py).
DISTANCE_TOL = 1e-3
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def vllm_backend(embedded_checkpoint: Path) -> Iterator[VllmBackend]:
    # The torch backend's checkpoint, so both report one model version ("embedded" itself
    # is served end to end below).
    backend = VllmBackend(str(embedded_checkpoint), device="cpu")
    yield backend
    backend.close()


def long_prompt_group(group: GroupInput, repeats: int = 6) -> GroupInput:
    """``group`` behind a prompt longer than a prefix-cache block (128 tokens on a CPU)."""
    prompt = np.tile(np.asarray(group.prompt_ids), repeats)
    return GroupInput(group_id="long", prompt_ids=prompt, rollouts=group.rollouts[:4])


def sequences_of(group: GroupInput) -> tuple[list[np.ndarray], list[int]]:
    prompt = np.asarray(group.prompt_ids)
    sequences = [np.concatenate([prompt, r.response_ids]) for r in group.rollouts]
    return sequences, [len(prompt)] * len(sequences)


def two_sequences(group: GroupInput) -> list[np.ndarray]:
    """Two of ``group``'s sequences, cheap to run (the weight-update tests run them several
    times)."""
    return sequences_of(group)[0][:2]


def save_checkpoint(weights: dict[str, torch.Tensor], like: Path, directory: Path) -> Path:
    """``weights`` as a checkpoint directory with the config and tokenizer of ``like``."""
    directory.mkdir()
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for file in like.iterdir():
        if file.suffix != ".safetensors":
            (directory / file.name).write_bytes(file.read_bytes())
    return directory


def after_a_step(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` moved in place by a stand-in for a trainer's step: every one scaled a
    little, each by its own factor (cheaper than noise on 135M weights), the final norm
    visibly."""
    for i, tensor in enumerate(weights.values()):
        tensor.mul_(1 + 1e-3 * (i % 7 + 1))
    weights["model.norm.weight"].mul_(1.25)
    return weights


def assert_states_match(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for states, reference in zip(got, expected, strict=True):
        assert states.shape == reference.shape
        torch.testing.assert_close(states.float(), reference.float(), atol=STATE_ATOL, rtol=0)


@pytest.mark.parametrize("path", ["packed", "prompt_once"])
def test_hidden_states_match_the_torch_backend(
    vllm_backend: VllmBackend,
    backend: TorchBackend,
    sampled_group: GroupInput,
    path: str,
) -> None:
    vllm_backend.forward_path = path
    sequences, hints = sequences_of(sampled_group)
    # A sequence without a prompt rides along.
    sequences.append(np.asarray(sampled_group.rollouts[0].response_ids[:9]))
    hints.append(0)
    try:
        got = vllm_backend.hidden_states(sequences, hints)
    finally:
        vllm_backend.forward_path = "auto"
    assert_states_match(got, backend.hidden_states(sequences))


def test_prefix_cache_runs_a_long_prompt_once_with_the_same_states(
    vllm_backend: VllmBackend, backend: TorchBackend, sampled_group: GroupInput
) -> None:
    sequences, hints = sequences_of(long_prompt_group(sampled_group))
    assert hints[0] >= 128
    before = vllm_backend.reused_prompt_tokens
    got = vllm_backend.hidden_states(sequences, hints)
    # Each of the 3 members after the first found at least one full block of the prompt.
    assert vllm_backend.reused_prompt_tokens - before >= 3 * 128
    assert_states_match(got, backend.hidden_states(sequences))
    # Asked again, even the first member's prompt is cached; its states are still whole.
    assert_states_match(vllm_backend.hidden_states(sequences, hints), got)


def test_values_through_the_engine_match_the_torch_backend(
    vllm_backend: VllmBackend, engine: Engine, sampled_group: GroupInput
) -> None:
    request = EstimateRequest(
        groups=[sampled_group, long_prompt_group(sampled_group)],
        methods=("numca", "hista", "group_mean"),
        explain=True,
    )
    got = Engine(vllm_backend).estimate(request)
    expected = engine.estimate(request)
    assert got.model.name == expected.model.name
    assert got.model.version == expected.model.version
    for group, reference in zip(got.groups, expected.groups, strict=True):
        for rollout, wanted in zip(group.rollouts, reference.rollouts, strict=True):
            for method in ("numca", "group_mean"):
                np.testing.assert_array_equal(rollout.values[method], wanted.values[method])
    assert_hista_agrees(got, expected, value_atol=VALUE_ATOL, distance_tol=DISTANCE_TOL)


def test_reload_swaps_weights_and_drops_the_prefix_cache(
    vllm_backend: VllmBackend, embedded_checkpoint: Path, sampled_group: GroupInput, tmp_path: Path
) -> None:
    sequences, hints = sequences_of(long_prompt_group(sampled_group))
    before = vllm_backend.hidden_states(sequences, hints)
    # Doubling the final norm's weight doubles every last-layer state exactly.
    weights = load_file(str(embedded_checkpoint / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    doubled = save_checkpoint(weights, embedded_checkpoint, tmp_path / "doubled")
    revision = vllm_backend.identity.revision
    try:
        identity = vllm_backend.apply_weights(vllm_backend.read_checkpoint(str(doubled)), "x2")
        assert (identity.version, identity.revision) == ("x2", revision + 1)
        # Cached keys and values of the old weights would leave the prompt's states wrong.
        after = vllm_backend.hidden_states(sequences, hints)
        assert_states_match(after, [2 * states for states in before])
    finally:
        vllm_backend.apply_weights(vllm_backend.read_checkpoint(str(embedded_checkpoint)))
    assert_states_match(vllm_backend.hidden_states(sequences, hints), before)
    with pytest.raises(CheckpointRefused, match="safetensors"):
        vllm_backend.read_checkpoint(str(tmp_path / "missing"))


def test_an_update_over_gloo_equals_a_disk_reload_of_the_same_weights(
    vllm_backend: VllmBackend, embedded_checkpoint: Path, sampled_group: GroupInput, tmp_path: Path
) -> None:
    weights = after_a_step(load_file(str(embedded_checkpoint / "model.safetensors")))
    # A trainer's state dict names the tied output embedding too.
    sent = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"]}
    sequences = two_sequences(sampled_group)
    before = vllm_backend.hidden_states(sequences)
    revision = vllm_backend.identity.revision
    try:
        with (
            running_server(vllm_backend, admin_token=TOKEN) as replica,
            ValueClient(replica.grpc_target, retries=0) as client,
        ):
            for tensors, named in (
                ({**sent, "model.norm.weight": torch.ones(3)}, "model.norm.weight has shape (3,)"),
                ({k: v for k, v in sent.items() if "layers.3.mlp" not in k}, "layers.3.mlp"),
            ):
                with pytest.raises(ReloadFailed) as caught:
                    client.update_weights(tensors, admin_token=TOKEN, transport="distributed")
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert named in str(caught.value.errors[replica.grpc_target])
            assert vllm_backend.identity.revision == revision
            result = client.update_weights(
                sent, admin_token=TOKEN, version="step-1", transport="distributed"
            )
            info = client.model_info()
        assert (result.version, result.revision) == ("step-1", revision + 1)
        assert (info.backend, info.version, info.revision) == ("vllm", "step-1", revision + 1)
        updated = vllm_backend.hidden_states(sequences)
        reload = save_checkpoint(weights, embedded_checkpoint, tmp_path / "step-1")
        vllm_backend.apply_weights(vllm_backend.read_checkpoint(str(reload)))
        from_disk = vllm_backend.hidden_states(sequences)
    finally:
        vllm_backend.apply_weights(vllm_backend.read_checkpoint(str(embedded_checkpoint)))
    for got, want, was in zip(updated, from_disk, before, strict=True):
        assert torch.equal(got, want)
        assert not torch.allclose(got, was, atol=10 * STATE_ATOL, rtol=0)


def test_a_load_that_fails_inside_vllm_falls_back_to_the_checkpoint_it_read_last(
    vllm_backend: VllmBackend, sampled_group: GroupInput
) -> None:
    sequences = two_sequences(sampled_group)
    before = vllm_backend.hidden_states(sequences)
    identity = vllm_backend.identity
    # A tensor that no check let through (the server checks every name and shape before
    # any byte moves): vLLM's loader fails on it while processing its layer.
    misfit = LoadedWeights({"model.layers.5.mlp.up_proj.weight": torch.zeros(10, 576)}, "bad")
    with pytest.raises(WeightLoadFailed, match="serves the checkpoint .* again"):
        vllm_backend.apply_weights(misfit)
    assert vllm_backend.identity.version == identity.version
    assert vllm_backend.identity.revision == identity.revision + 1
    for got, want in zip(vllm_backend.hidden_states(sequences), before, strict=True):
        assert torch.equal(got, want)


def test_layer_and_forward_path_are_checked() -> None:
    with pytest.raises(ValueError, match="last layer"):
        VllmBackend("embedded", layer=3)
    with pytest.raises(ValueError, match="packs sequences"):
        VllmBackend("embedded", forward_path="padded")


@pytest.mark.slow
def test_serve_with_the_vllm_backend_end_to_end(
    vllm_backend: VllmBackend, engine: Engine, sampled_group: GroupInput, tmp_path: Path
) -> None:
    process, grpc_port, http_port, log = start_serve_process(
        tmp_path / "serve.log", "--backend", "vllm"
    )
    try:
        wait_for(lambda: serve_ready(process, http_port), timeout=600, what="vllm serve ready")
        model = httpx.get(f"http://127.0.0.1:{http_port}/v1/model", timeout=10).json()
        assert model["name"] == engine.model.name
        # vLLM answers, on its default path (a group's prompt once, through the prefix cache).
        assert (model["backend"], model["forward_path"]) == ("vllm", "prompt_once")
        # The served defaults; the same backend in this process is the reference (its
        # parity with the torch backend, ties allowed for, is the test above).
        expected = Engine(vllm_backend).estimate(EstimateRequest(groups=[sampled_group]))
        expected = expected.groups[0]
        group = Group(
            prompt_ids=np.asarray(sampled_group.prompt_ids),
            rollouts=[
                Rollout(response_ids=r.response_ids, reward=r.reward)
                for r in sampled_group.rollouts
            ],
        )
        with ValueClient(f"127.0.0.1:{grpc_port}") as client:
            got = client.estimate([group]).groups[0]
            info = client.model_info()
        assert (info.backend, info.forward_path) == ("vllm", "prompt_once")
        for rollout, wanted in zip(got.rollouts, expected.rollouts, strict=True):
            np.testing.assert_allclose(
                rollout.values["hista"], wanted.values["hista"], atol=VALUE_ATOL
            )
            np.testing.assert_array_equal(rollout.values["numca"], wanted.values["numca"])
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
