"""A trainer's padded flat batch through the Python client and back, on a real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from statevalue_client import ValueClient, groups_from_flat_batch, scatter_to_padded
from tests.servers import ServerThread, running_server

METHODS = ("numca", "hista", "group_mean")
PARAMS: dict[str, dict[str, Any]] = {"hista": {"node_spacing": 4, "d_min": 0.5}}
P, L = 9, 20  # padded prompt and response widths


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as running:
        yield running


def trainer_batch() -> dict[str, Any]:
    """2 groups x 4 rollouts, rows shuffled, as a trainer holds them (torch tensors)."""
    rng = np.random.default_rng(7)
    prompts = {"uid-a": rng.integers(100, 30_000, 6), "uid-b": rng.integers(100, 30_000, 9)}
    rows = [(key, j) for key in prompts for j in range(4)]
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    batch = len(rows)
    prompt_ids = np.zeros((batch, P), dtype=np.int64)
    prompt_mask = np.zeros((batch, P), dtype=np.int64)
    response_ids = np.zeros((batch, L), dtype=np.int64)
    response_mask = np.zeros((batch, L), dtype=np.int64)
    rewards = np.zeros(batch, dtype=np.float32)
    lengths = []
    for row, (key, j) in enumerate(rows):
        prompt = prompts[key]
        prompt_ids[row, P - len(prompt) :] = prompt  # left padding
        prompt_mask[row, P - len(prompt) :] = 1
        n = 8 + 3 * j + (key == "uid-b")  # 8..18 tokens, always short of L
        response_ids[row, :n] = rng.integers(100, 30_000, n)  # right padding
        response_mask[row, :n] = 1
        rewards[row] = float((j + (key == "uid-b")) % 2)
        lengths.append(n)
    return {
        "rows": rows,
        "lengths": lengths,
        "prompts": prompts,
        "prompt_ids": torch.from_numpy(prompt_ids),
        "prompt_mask": torch.from_numpy(prompt_mask),
        "response_ids": torch.from_numpy(response_ids),
        "response_mask": torch.from_numpy(response_mask),
        "rewards": torch.from_numpy(rewards),
        "group_index": [key for key, _ in rows],
    }


def test_flat_batch_round_trip(server: ServerThread, engine: Engine) -> None:
    batch = trainer_batch()
    groups, layout = groups_from_flat_batch(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["response_ids"],
        batch["response_mask"],
        batch["rewards"],
        batch["group_index"],
    )
    # Whole groups, each prompt without its padding, each response without its padding.
    assert sorted(g.group_id for g in groups) == ["uid-a", "uid-b"]
    assert sorted(len(r) for r in layout.rows) == [4, 4]
    assert (layout.batch_size, layout.response_length) == (8, L)
    for group, rows in zip(groups, layout.rows, strict=True):
        np.testing.assert_array_equal(group.prompt_ids, batch["prompts"][group.group_id])
        for rollout, row in zip(group.rollouts, rows, strict=True):
            assert batch["rows"][row][0] == group.group_id
            assert len(rollout.response_ids) == batch["lengths"][row]

    with ValueClient(server.grpc_target) as client:
        result = client.estimate(groups, METHODS, **PARAMS)
    padded = scatter_to_padded(result, layout, batch["response_mask"])

    # Expected: the in-process engine on the same groups built by hand, row by row.
    expected = {}
    for key, prompt in batch["prompts"].items():
        members = [row for row, (k, _) in enumerate(batch["rows"]) if k == key]
        group = GroupInput(
            group_id=key,
            prompt_ids=prompt,
            rollouts=[
                RolloutInput(
                    response_ids=batch["response_ids"][row, : batch["lengths"][row]].numpy(),
                    reward=float(batch["rewards"][row]),
                )
                for row in members
            ],
        )
        answer = engine.estimate(
            EstimateRequest(
                groups=[group], methods=METHODS, config=EstimatorConfig.model_validate(PARAMS)
            )
        )
        for row, rollout in zip(members, answer.groups[0].rollouts, strict=True):
            expected[row] = rollout

    mask = batch["response_mask"].numpy().astype(bool)
    assert sorted(padded) == sorted(METHODS)
    for method in METHODS:
        values, advantages = padded[method]
        assert values.shape == advantages.shape == (8, L)
        assert values.dtype == advantages.dtype == np.float32
        assert not values[~mask].any() and not advantages[~mask].any()
        for row in range(8):
            n = batch["lengths"][row]
            np.testing.assert_allclose(values[row, :n], expected[row].values[method], atol=1e-5)
            np.testing.assert_allclose(
                advantages[row, :n], expected[row].advantages[method], atol=1e-5
            )
    # The rewards reach the right rows: group-mean advantages have the sign of R - mean.
    gm = padded["group_mean"][1][:, 0]
    np.testing.assert_array_equal(np.sign(gm), np.where(batch["rewards"].numpy() > 0.5, 1, -1))


def test_nan_reward_row_is_a_query(server: ServerThread) -> None:
    batch = trainer_batch()
    rewards = batch["rewards"].clone()
    query = 3
    rewards[query] = float("nan")
    groups, layout = groups_from_flat_batch(
        batch["prompt_ids"],
        batch["prompt_mask"],
        batch["response_ids"],
        batch["response_mask"],
        rewards,
        batch["group_index"],
    )
    g = next(i for i, rows in enumerate(layout.rows) if query in rows)
    j = layout.rows[g].index(query)
    assert groups[g].rollouts[j].reward is None
    with ValueClient(server.grpc_target) as client:
        result = client.estimate(groups, ["group_mean"])
    values, _ = scatter_to_padded(result, layout, batch["response_mask"])["group_mean"]
    # A query adds nothing to its group: the baseline is the mean of the other three.
    others = [row for row in layout.rows[g] if row != query]
    mean = float(np.mean(batch["rewards"].numpy()[others]))
    n = batch["lengths"][query]
    np.testing.assert_allclose(values[query, :n], mean, rtol=1e-6)


def test_mismatched_batch_sizes_are_refused() -> None:
    batch = trainer_batch()
    with pytest.raises(ValueError, match="same batch size"):
        groups_from_flat_batch(
            batch["prompt_ids"],
            batch["prompt_mask"],
            batch["response_ids"],
            batch["response_mask"],
            batch["rewards"][:-1],
            batch["group_index"],
        )
