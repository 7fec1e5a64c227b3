"""Hista: smoothing, prefix distances, neighbour selection and token values on hand-sized cases."""

import math

import numpy as np
import pytest
import torch

from statevalue.config import HistaConfig
from statevalue.estimators import (
    ema_smooth,
    hista_nodes,
    hista_values,
    hista_values_explained,
    neighbour_counts,
    prefix_chamfer,
    prefix_distances,
)
from statevalue.estimators import hista as hista_module

# The rules these hand-checked cases were written for: the alternatives to the reference
# rules (each reference rule has its own cases in tests/test_hista_reference.py).
ALT = {
    "ema_start": "zero",
    "downsample": "causal",
    "node_anchor": "response_start",
    "end_node": "after_response",
    "k_schedule": "linear",
    "neighbours": "with_ties",
    "own_nodes": "boundary",
}
# No smoothing and every vector kept: the representation is the hidden states themselves.
RAW = {**ALT, "ema_alpha": 0.0, "stride": 1, "node_spacing": 1, "tau": 1.0}


def states(*rows: list[float] | float) -> torch.Tensor:
    """(L, H) hidden states; a bare number is a 1-D state."""
    return torch.tensor([r if isinstance(r, list) else [r] for r in rows], dtype=torch.float32)


def naive_ema(x: torch.Tensor, alpha: float) -> torch.Tensor:
    e = torch.zeros(x.shape[-1], dtype=torch.float64)
    out = []
    for t in range(x.shape[0]):
        e = alpha * e + (1 - alpha) * x[t].double()
        out.append(e / (1 - alpha ** (t + 1)))
    return torch.stack(out)


def test_ema_by_hand() -> None:
    # e1 = 0.5·2 = 1 -> 1 / 0.5 = 2; e2 = 0.5·1 + 0.5·4 = 2.5 -> 2.5 / 0.75.
    got = ema_smooth(states(2.0, 4.0), 0.5)
    np.testing.assert_allclose(got[:, 0].numpy(), [2.0, 2.5 / 0.75], rtol=1e-6)
    assert got.dtype == torch.float32


@pytest.mark.parametrize(("alpha", "length"), [(0.0, 7), (0.5, 150), (0.7, 150), (0.9, 500)])
def test_ema_matches_the_recursion(alpha: float, length: int) -> None:
    x = torch.randn(3, length, 4, generator=torch.Generator().manual_seed(1))
    got = ema_smooth(x, alpha, "zero")
    for b in range(3):
        np.testing.assert_allclose(got[b].numpy(), naive_ema(x[b], alpha).numpy(), atol=1e-5)
    np.testing.assert_array_equal(ema_smooth(x[1], alpha).numpy(), got[1].numpy())


def test_ema_of_bf16_and_empty() -> None:
    assert ema_smooth(torch.ones(3, 2, dtype=torch.bfloat16), 0.7).dtype == torch.float32
    np.testing.assert_allclose(ema_smooth(torch.ones(3, 2), 0.7).numpy(), 1.0, rtol=1e-6)
    assert ema_smooth(torch.zeros(0, 2), 0.7).shape == (0, 2)


def test_prefix_chamfer_by_hand() -> None:
    a = states([0.0, 0.0], [3.0, 4.0])
    b = states([0.0, 1.0])
    # Over the longer a: (0,0)->(0,1) is 1, (3,4)->(0,1) is sqrt(18).
    expected = (1 + math.sqrt(18)) / 2
    assert prefix_chamfer(a, b) == pytest.approx(expected)
    assert prefix_chamfer(b, a) == pytest.approx(expected)


def test_prefix_chamfer_of_equal_lengths_is_over_the_first() -> None:
    a = states([0.0, 0.0], [4.0, 0.0])
    b = states([1.0, 0.0], [1.0, 0.0])
    assert prefix_chamfer(a, b) == pytest.approx(2.0)  # 1 and 3
    assert prefix_chamfer(b, a) == pytest.approx(1.0)  # 1 and 1
    with pytest.raises(ValueError):
        prefix_chamfer(a, b[:0])


def test_vectorised_prefix_distances_match_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 7, 5, generator=gen), torch.randn(3, 6, 5, generator=gen)
    x_len = torch.randint(1, 8, (3, 4), generator=gen)
    y_len = torch.randint(1, 7, (3, 5), generator=gen)
    x_len[0, 0], y_len[0, 0] = 4, 4  # equal lengths are covered
    got = prefix_distances(x, y, x_len, y_len)
    assert got.shape == (3, 4, 5)
    for p in range(3):
        for a in range(4):
            for b in range(5):
                expected = prefix_chamfer(x[p, : x_len[p, a]], y[p, : y_len[p, b]])
                assert got[p, a, b].item() == pytest.approx(expected, rel=1e-5)


def test_neighbour_counts_fall_linearly() -> None:
    assert neighbour_counts(5, 66, 6, "linear").tolist() == [66, 51, 36, 21, 6]
    assert neighbour_counts(1, 66, 6, "linear").tolist() == [66]
    assert neighbour_counts(3, 4, 1, "linear").tolist() == [4, 3, 1]  # 2.5 rounds up
    assert neighbour_counts(2, 5, 5, "linear").tolist() == [5, 5]


# Rollout 0 (R=1): prompt 0, then 4, 4. Rollout 1 (R=0): prompt 0, then 3.
# Query = rollout 0's interior node b=1, prefix [0, 4]. Its candidates and distances:
#   own b=0 [0]: (0 + 4) / 2 = 2;  own b=1 itself: 0;  own b=2 [0, 4, 4]: 0 (not allowed);
#   rollout 1 b=0 [0]: 2;  rollout 1 b=1 [0, 3]: (0 + 1) / 2 = 0.5.
OWN_CASE = ([states(0.0, 4.0, 4.0), states(0.0, 3.0)], 1, [2, 1], np.array([1.0, 0.0]))


def own_case(**config: float) -> list[np.ndarray]:
    hidden, prompt_len, lengths, rewards = OWN_CASE
    estimate = hista_values(
        hidden, prompt_len, lengths, rewards, np.array([True, True]), HistaConfig(**RAW, **config)
    )
    assert [b.tolist() for b in estimate.boundaries] == [[0, 1], [0]]
    return estimate.values


def test_all_candidates_weighted_by_inverse_distance() -> None:
    values = own_case(d_min=0.1, k_max=10, k_min=10)
    # Weights 1/2, 1/0.1 (R=1) and 1/2, 1/0.5 (R=0); the start segment gets the group mean.
    np.testing.assert_allclose(values[0], [0.5, 10.5 / 13], rtol=1e-6)
    np.testing.assert_allclose(values[1], [0.5])


def test_own_longer_prefix_is_not_a_candidate() -> None:
    # The two nearest are the node itself (0.1) and rollout 1's end (0.5). If the own end
    # node (distance 0 -> 0.1, R=1) were a candidate, the value would be 1.
    values = own_case(d_min=0.1, k_max=2, k_min=2)
    np.testing.assert_allclose(values[0], [0.5, 10 / 12], rtol=1e-6)


def test_distances_are_clamped_to_d_min() -> None:
    # d_min = 1: itself and rollout 1's end both sit at 1 and are the two nearest.
    np.testing.assert_allclose(own_case(d_min=1.0, k_max=2, k_min=2)[0], [0.5, 0.5], rtol=1e-6)


def test_candidates_tied_with_the_kth_all_count() -> None:
    # d_min = 3 clamps all four candidates to 3: with k = 2 all four tie with the 2nd
    # nearest, so all count equally (two R=1, two R=0) whatever the rollout order.
    np.testing.assert_allclose(own_case(d_min=3.0, k_max=2, k_min=2)[0], [0.5, 0.5], rtol=1e-6)


def test_k_schedule_per_interior_node() -> None:
    # Rollout 0 (R=1): 0, 1, 1, 1 -> interior nodes b=1 [0, 1] and b=2 [0, 1, 1].
    # Rollout 1 (R=0): 0, 1.5 -> nodes [0] and [0, 1.5].
    # b=1: own [0] 0.5, itself 0 -> 0.01, r1 [0] 0.5, r1 [0, 1.5] 0.25.
    # b=2: own [0] 2/3, own b=1 0, itself 0 -> 0.01, r1 [0] 2/3, r1 [0, 1.5] 1/3.
    hidden = [states(0.0, 1.0, 1.0, 1.0), states(0.0, 1.5)]
    config = HistaConfig(**RAW, d_min=0.01, k_max=3, k_min=1)
    estimate = hista_values(hidden, 1, [3, 1], np.array([1.0, 0.0]), np.array([True, True]), config)
    # b=1 takes k=3: 100 (R=1), 4 (R=0) and both 0.5-distant nodes tied with the 3rd:
    # own start (R=1) and rollout 1's start (R=0), weight 2 each.
    # b=2 takes k=1: the two clamped nodes tie, own b=1 and itself (both R=1).
    np.testing.assert_allclose(estimate.values[0], [0.5, 102 / 108, 1.0], rtol=1e-6)


def test_queries_see_only_rewarded_nodes() -> None:
    # Rewarded: R=1 (0, 2) and R=0 (0, 6). Query (reward 100 ignored): 0, 3, 3.
    # Its interior node [0, 3]: [0] 1.5 (twice), [0, 2] 0.5, [0, 6] 1.5.
    hidden = [states(0.0, 2.0), states(0.0, 6.0), states(0.0, 3.0, 3.0)]
    rewards = np.array([1.0, 0.0, 100.0])
    config = HistaConfig(**RAW, d_min=0.01, k_max=10, k_min=10)
    estimate = hista_values(hidden, 1, [1, 1, 2], rewards, np.array([True, True, False]), config)
    np.testing.assert_allclose(estimate.values[2], [0.5, (2 / 3 + 2) / 4], rtol=1e-6)
    np.testing.assert_allclose(estimate.values[0], [0.5])


def test_query_does_not_change_rewarded_values() -> None:
    gen = torch.Generator().manual_seed(3)
    hidden = [torch.randn(2 + t, 3, generator=gen) for t in (4, 5, 3)]
    config = HistaConfig(**RAW, d_min=0.01, k_max=4, k_min=2)
    with_query = hista_values(
        hidden, 2, [4, 5, 3], np.array([1.0, 0.0, 7.0]), np.array([True, True, False]), config
    )
    alone = hista_values(
        hidden[:2], 2, [4, 5], np.array([1.0, 0.0]), np.array([True, True]), config
    )
    for a, b in zip(with_query.values[:2], alone.values, strict=True):
        np.testing.assert_array_equal(a, b)


def test_stride_keeps_every_wth_smoothed_state() -> None:
    # stride 2, prompt 3: r = (h1, h3); the 9s are never kept. Prefix of node b has
    # floor((3 + b) / 2) vectors: start [h1], b=1 and the end b=2 [h1, h3].
    hidden = [states(9.0, 0.0, 9.0, 1.0, 9.0), states(9.0, 0.0, 9.0, 5.0, 7.0)]
    config = HistaConfig(**{**RAW, "stride": 2}, d_min=0.01, k_max=10, k_min=10)
    estimate = hista_values(hidden, 3, [2, 2], np.array([1.0, 0.0]), np.array([True, True]), config)
    # Rollout 0's node [0, 1]: own start 0.5, itself 0.01 (R=1); rollout 1's 0.5, 0.5, 0.5.
    np.testing.assert_allclose(estimate.values[0], [0.5, 102 / 108], rtol=1e-6)
    # Rollout 1's node [0, 5]: rollout 0's 2.5, 2, 2 (R=1); own start 2.5, itself 0.01.
    np.testing.assert_allclose(estimate.values[1], [0.5, 1.4 / 101.8], rtol=1e-6)


def test_sequence_shorter_than_the_stride_uses_its_last_state() -> None:
    # With stride 5 every prefix is the single last smoothed vector: all distances tie
    # at d_min and every allowed candidate counts equally.
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(4, 2, generator=gen), torch.randn(2, 2, generator=gen)]
    config = HistaConfig(**ALT, stride=5, node_spacing=1, d_min=1.0, k_max=10, k_min=10)
    estimate = hista_values(hidden, 1, [3, 1], np.array([1.0, 0.0]), np.array([True, True]), config)
    # b=1: own start and itself (R=1) + rollout 1's two nodes (R=0) -> 2/4; b=2: 3/5.
    np.testing.assert_allclose(estimate.values[0], [0.5, 0.5, 0.6], rtol=1e-6)


def test_chunked_distances_give_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(5)
    lengths = [9, 0, 6, 11]
    hidden = [torch.randn(4 + t, 8, generator=gen) for t in lengths]
    rewards, rewarded = np.array([0.1, 0.9, 0.4, 0.6]), np.array([True, True, False, True])
    config = HistaConfig(**ALT, stride=2, node_spacing=3, d_min=0.1, k_max=5, k_min=2)
    whole = hista_values(hidden, 4, lengths, rewards, rewarded, config)
    monkeypatch.setattr(hista_module, "_CHUNK_BYTES", 1)
    chunked = hista_values(hidden, 4, lengths, rewards, rewarded, config)
    for a, b in zip(whole.values, chunked.values, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [len(v) for v in whole.values] == lengths
    assert [b.tolist() for b in whole.boundaries] == [[0, 3, 6], [], [0, 3], [0, 3, 6, 9]]


@pytest.mark.parametrize(
    "config",
    [
        HistaConfig(stride=2, node_spacing=3, k_max=5, k_min=2),
        HistaConfig.reference(stride=2, node_spacing=3, k_max=4, k_min=2, own_weight=0.5, tau=2),
        HistaConfig(**ALT, stride=1, node_spacing=2, d_min=0.1, k_max=3, k_min=3),
    ],
    ids=["default", "reference", "alternatives"],
)
def test_explained_neighbours_add_up_to_the_values(config: HistaConfig) -> None:
    gen = torch.Generator().manual_seed(11)
    lengths = [9, 0, 6, 11, 1]
    hidden = [torch.randn(4 + t, 8, generator=gen) for t in lengths]
    rewards = np.array([0.1, 0.9, 0.4, 0.6, 1.0])
    rewarded = np.array([True, True, False, True, True])
    plain = hista_values(hidden, 4, lengths, rewards, rewarded, config)
    explained, nodes = hista_values_explained(hidden, 4, lengths, rewards, rewarded, config)
    for a, b in zip(plain.values, explained.values, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(nodes) == len(lengths)
    for i, (rollout_nodes, values) in enumerate(zip(nodes, plain.values, strict=True)):
        assert [n.token for n in rollout_nodes] == plain.boundaries[i][1:].tolist()[
            : len(rollout_nodes)
        ]
        for node in rollout_nodes:
            assert node.neighbours
            assert math.isclose(sum(n.weight for n in node.neighbours), 1.0, rel_tol=1e-12)
            assert all(
                rewarded[n.rollout] and 0 <= n.token <= lengths[n.rollout] for n in node.neighbours
            )
            distances = [n.distance for n in node.neighbours]
            assert distances == sorted(distances)
            value = sum(n.weight * rewards[n.rollout] for n in node.neighbours)
            assert values[node.token] == pytest.approx(value, abs=1e-6)
    assert sum(len(n) for n in nodes) >= 6


def test_bf16_hidden_states() -> None:
    hidden = [states(0.0, 4.0, 4.0).bfloat16(), states(0.0, 3.0).bfloat16()]
    estimate = hista_values(
        hidden,
        1,
        [2, 1],
        np.array([1.0, 0.0]),
        np.array([True, True]),
        HistaConfig(**RAW, d_min=0.1, k_max=10, k_min=10),
    )
    np.testing.assert_allclose(estimate.values[0], [0.5, 10.5 / 13], rtol=1e-6)


def test_rejects_wrong_hidden_shapes() -> None:
    with pytest.raises(ValueError, match="hidden"):
        hista_values([states(0.0, 1.0)], 1, [2], np.array([1.0]), np.array([True]), HistaConfig())


def test_own_weight_scales_the_rollouts_own_nodes() -> None:
    # k = 10: all four candidates. Own weights 1/2 and 1/0.1 (R=1) are multiplied by w.
    for w in (1.0, 0.5, 0.1):
        own = w * (1 / 2 + 1 / 0.1)
        other = 1 / 2 + 1 / 0.5
        values = own_case(d_min=0.1, k_max=10, k_min=10, own_weight=w)
        np.testing.assert_allclose(values[0], [0.5, own / (own + other)], rtol=1e-6)


def test_own_weight_zero_leaves_only_other_rollouts() -> None:
    # k = 1: without its own nodes the nearest is rollout 1's end (R=0), not the node itself.
    np.testing.assert_allclose(own_case(d_min=0.1, k_max=1, k_min=1, own_weight=0.0)[0], [0.5, 0])
    # A single rewarded rollout has no other candidates: its interior nodes get the mean.
    estimate = hista_values(
        [states(0.0, 1.0, 2.0)],
        1,
        [2],
        np.array([1.0]),
        np.array([True]),
        HistaConfig(**{**RAW, "tau": 0.0}, own_weight=0.0),
    )
    np.testing.assert_allclose(estimate.values[0], [1.0, 1.0])


def test_relative_d_min_is_a_fraction_of_the_median_complete_distance() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [6, 9, 4, 7]
    hidden = [torch.randn(2 + n, 3, generator=gen) for n in lengths]
    rewards = np.array([1.0, 0.0, 1.0, 0.0])
    rewarded = np.array([True, True, True, False])
    base = {**ALT, "ema_alpha": 0.0, "stride": 1, "node_spacing": 2, "k_max": 3, "k_min": 1}
    # The scale is over ordered pairs of the rewarded rollouts only: a query rollout must
    # not change it.
    full = [prefix_chamfer(hidden[i], hidden[j]) for i in range(3) for j in range(3) if i != j]
    d_min = 0.4 * float(np.median(full))
    relative = hista_values(
        hidden, 2, lengths, rewards, rewarded, HistaConfig(**base, relative_d_min=0.4)
    )
    absolute = hista_values(hidden, 2, lengths, rewards, rewarded, HistaConfig(**base, d_min=d_min))
    for got, want in zip(relative.values, absolute.values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # The clamp bites: the same relative value on a rescaled group gives the same values.
    scaled = hista_values(
        [10 * h for h in hidden],
        2,
        lengths,
        rewards,
        rewarded,
        HistaConfig(**base, relative_d_min=0.4),
    )
    for got, want in zip(scaled.values, relative.values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_relative_d_min_does_not_depend_on_the_rollouts_order() -> None:
    # Equally long rollouts: their distance depends on the direction, so the scale must
    # take both directions.
    hidden = [states(0.0, 0.0, 4.0), states(0.0, 1.0, 1.0)]
    config = HistaConfig(**RAW, relative_d_min=0.5, k_max=3, k_min=1)
    forward = hista_values(hidden, 1, [2, 2], np.array([0.0, 1.0]), np.array([True, True]), config)
    backward = hista_values(
        hidden[::-1], 1, [2, 2], np.array([1.0, 0.0]), np.array([True, True]), config
    )
    for got, want in zip(backward.values[::-1], forward.values, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_a_relative_spacing_needs_the_group() -> None:
    with pytest.raises(ValueError, match="group_node_spacing"):
        hista_nodes(3, 80, HistaConfig(relative_node_spacing=0.1))


def test_relative_spacing_values_equal_the_fixed_spacing_they_give() -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [16, 24, 20]
    hidden = [torch.randn(2 + n, 4, generator=gen) for n in lengths]
    rewards, rewarded = np.array([1.0, 0.0, 1.0]), np.array([True, True, True])
    relative = HistaConfig(relative_node_spacing=0.25)  # 0.25 × median 20 = 5 tokens
    fixed = HistaConfig(node_spacing=5)
    got = hista_values(hidden, 2, lengths, rewards, rewarded, relative)
    want = hista_values(hidden, 2, lengths, rewards, rewarded, fixed)
    for a, b in zip(got.values + got.boundaries, want.values + want.boundaries, strict=True):
        np.testing.assert_array_equal(a, b)
