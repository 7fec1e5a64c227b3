"""Properties of all estimators on random groups (hypothesis)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from statevalue.config import HistaConfig, NumcaConfig
from statevalue.estimators import (
    NumcaTable,
    ValueEstimate,
    group_mean_values,
    group_merge_distance,
    group_node_spacing,
    hista_values,
    numca_path,
    numca_values,
)

PIECES = ["a", " ", "1", "2", "3", " 7", "4.5", ".", "/", " x", "10", ",", "0"]
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def groups(draw: st.DrawFn, equal_rewards: bool = False) -> dict:
    size = draw(st.integers(1, 5))
    responses = [draw(st.lists(st.sampled_from(PIECES), max_size=14)) for _ in range(size)]
    reward = st.floats(-2, 2, allow_nan=False)
    rewards = np.array(
        [draw(reward)] * size
        if equal_rewards
        else draw(st.lists(reward, min_size=size, max_size=size))
    )
    rewarded = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)))
    rewarded[draw(st.integers(0, size - 1))] = True
    return {
        "responses": responses,
        "lengths": [len(r) for r in responses],
        "rewards": rewards,
        "rewarded": rewarded,
        "prompt_len": draw(st.integers(1, 4)),
        "seed": draw(st.integers(0, 2**16)),
        "numca": NumcaConfig(
            number_pattern=draw(st.sampled_from(["digits", "decimal"])),
            merge_distance=draw(st.integers(0, 3)),
            relative_merge_distance=draw(st.sampled_from([0.0, 0.2, 0.5])),
            drop_last_number=draw(st.booleans()),
            number_boundary=draw(st.sampled_from(["after_first_token", "at_first_token"])),
            table_states=draw(st.sampled_from(["chain", "path"])),
            # An unseen state reading 0.0 (the reference) can leave the reward range.
            unseen_state="previous",
            prior_count=draw(st.sampled_from([0.0, 0.5, 2.0])),
        ),
        "hista": HistaConfig(
            ema_alpha=draw(st.sampled_from([0.0, 0.5, 0.7])),
            stride=draw(st.integers(1, 3)),
            node_spacing=draw(st.integers(1, 4)),
            relative_node_spacing=draw(st.sampled_from([0.0, 0.25, 0.5])),
            **draw(st.sampled_from([{"d_min": 1e-3}, {"relative_d_min": 0.05}])),
            k_max=draw(st.integers(3, 8)),
            k_min=draw(st.integers(1, 3)),
            own_weight=draw(st.sampled_from([1.0, 0.5, 0.0])),
            ema_start=draw(st.sampled_from(["first", "zero"])),
            downsample=draw(st.sampled_from(["inclusive", "causal"])),
            node_anchor=draw(st.sampled_from(["prompt_start", "response_start"])),
            end_node=draw(st.sampled_from(["last_token", "after_response"])),
            k_schedule=draw(st.sampled_from(["floor_step", "linear"])),
            neighbours=draw(st.sampled_from(["top_k", "with_ties"])),
            own_nodes=draw(st.sampled_from(["prefix_length", "boundary"])),
        ),
    }


def run_numca(g: dict, order: list[int] | None = None) -> ValueEstimate:
    order = list(range(len(g["lengths"]))) if order is None else order
    lengths = [g["lengths"][i] for i in order]
    rewards, rewarded = g["rewards"][order], g["rewarded"][order]
    config = group_merge_distance(lengths, rewarded, g["numca"])
    paths = []
    for i in order:
        tokens = g["responses"][i]
        ends = np.cumsum([len(t) for t in tokens], dtype=np.int64)
        paths.append(numca_path("".join(tokens), ends, config))
    return numca_values(paths, lengths, rewards, rewarded, NumcaTable(), g["numca"])


def hidden_states(g: dict) -> list[torch.Tensor]:
    # Independent states per rollout (prompt included) so that no two distances tie.
    gen = torch.Generator().manual_seed(g["seed"])
    return [torch.randn(g["prompt_len"] + t, 8, generator=gen) for t in g["lengths"]]


def run_hista(g: dict, order: list[int] | None = None) -> ValueEstimate:
    order = list(range(len(g["lengths"]))) if order is None else order
    hidden = hidden_states(g)
    return hista_values(
        [hidden[i] for i in order],
        g["prompt_len"],
        [g["lengths"][i] for i in order],
        g["rewards"][order],
        g["rewarded"][order],
        g["hista"],
    )


def all_methods(g: dict) -> list[ValueEstimate]:
    return [
        group_mean_values(g["lengths"], g["rewards"], g["rewarded"]),
        run_numca(g),
        run_hista(g),
    ]


@SETTINGS
@given(groups())
def test_one_value_per_token_and_sane_boundaries(g: dict) -> None:
    for estimate in all_methods(g):
        assert [len(v) for v in estimate.values] == g["lengths"]
        for values, bounds, length in zip(
            estimate.values, estimate.boundaries, g["lengths"], strict=True
        ):
            assert values.dtype == np.float32
            if length:
                assert bounds[0] == 0 and bounds[-1] < length and np.all(np.diff(bounds) > 0)
            else:
                assert len(bounds) == 0


@SETTINGS
@given(groups())
def test_values_lie_between_the_rewards(g: dict) -> None:
    rewards = g["rewards"][g["rewarded"]]
    for estimate in all_methods(g):
        for values in estimate.values:
            assert np.all(values >= np.float32(rewards.min()) - 1e-6)
            assert np.all(values <= np.float32(rewards.max()) + 1e-6)


@SETTINGS
@given(groups(equal_rewards=True))
def test_equal_rewards_give_that_value_everywhere(g: dict) -> None:
    reward = g["rewards"][0]
    for estimate in all_methods(g):
        for values in estimate.values:
            np.testing.assert_allclose(values, reward, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(groups(), st.randoms(use_true_random=False))
def test_permuting_rollouts_permutes_the_outputs(g: dict, random) -> None:
    order = list(range(len(g["lengths"])))
    random.shuffle(order)
    # Plain top-k breaks ties at the k-th distance by candidate order, i.e. by rollout order.
    g = {**g, "hista": g["hista"].model_copy(update={"neighbours": "with_ties"})}
    for run in (run_numca, run_hista):
        plain, permuted = run(g), run(g, order)
        for position, i in enumerate(order):
            np.testing.assert_allclose(permuted.values[position], plain.values[i], atol=1e-6)
            np.testing.assert_array_equal(permuted.boundaries[position], plain.boundaries[i])


@settings(max_examples=15, deadline=None)
@given(groups())
def test_hista_is_deterministic(g: dict) -> None:
    first, second = run_hista(g), run_hista(g)
    for a, b in zip(first.values, second.values, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("resolve", "model", "fixed", "relative", "lower"),
    [
        (group_node_spacing, HistaConfig, "node_spacing", "relative_node_spacing", 1),
        (group_merge_distance, NumcaConfig, "merge_distance", "relative_merge_distance", 0),
    ],
)
def test_relative_lengths_follow_the_rewarded_responses(
    resolve: Callable[..., Any], model: type[Any], fixed: str, relative: str, lower: int
) -> None:
    config = model.model_validate({relative: 0.05})
    rewarded = np.array([True, True, True, False])
    # Median of the rewarded lengths 60, 80, 100 is 80: 4 tokens; the query's 400 tokens
    # change nothing.
    assert getattr(resolve([60, 80, 100, 400], rewarded, config), fixed) == 4
    # Bounded by the fixed length (the reference's 50) above, and below.
    assert getattr(resolve([2000] * 3, rewarded[:3], config), fixed) == 50
    assert getattr(resolve([5, 9], rewarded[:2], config), fixed) == lower
    capped = model.model_validate({fixed: 3, relative: 0.5})
    assert getattr(resolve([80], rewarded[:1], capped), fixed) == 3
    # Set alone, a length is the fixed one, used as it is.
    alone = model.model_validate({fixed: 7})
    assert getattr(alone, relative) == 0.0 and resolve([80], rewarded[:1], alone) is alone
