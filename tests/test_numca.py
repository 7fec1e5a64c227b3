"""Numca: number finding, boundaries, merging, paths, the per-prompt table and token values."""

import numpy as np
import pytest

from statevalue.config import NumcaConfig
from statevalue.estimators import (
    NumcaPath,
    NumcaTable,
    find_numbers,
    merge_boundaries,
    number_boundaries,
    numca_path,
    numca_values,
    read_numca_values,
)

E = frozenset()


def s(*numbers: str) -> frozenset[str]:
    return frozenset(numbers)


def tokenised(tokens: list[str]) -> tuple[str, np.ndarray]:
    """Response text and the character end offset of each token."""
    return "".join(tokens), np.cumsum([len(t) for t in tokens])


def test_digits_are_maximal_digit_runs() -> None:
    assert find_numbers("x 3.50 + 1/2 = 4.", "digits") == [
        (2, "3"),
        (4, "50"),
        (9, "1"),
        (11, "2"),
        (15, "4"),
    ]


def test_decimal_keeps_decimals_and_fractions_whole() -> None:
    assert find_numbers("x 3.50 + 1/2 = 4.", "decimal") == [(2, "3.5"), (9, "1/2"), (15, "4")]


def test_decimal_canonicalises_equal_values() -> None:
    found = [
        n for _, n in find_numbers("3.50, 3.5; 03.5 2.0 1,000 1000 12,5 0.0 2.5/10", "decimal")
    ]
    assert found == ["3.5", "3.5", "3.5", "2", "1000", "1000", "12", "5", "0", "2.5/10"]


def test_unknown_pattern() -> None:
    with pytest.raises(ValueError, match="pattern"):
        find_numbers("1", "roman")  # type: ignore[arg-type]


def test_boundary_is_after_the_token_holding_the_first_character() -> None:
    token_ends = np.array([2, 5, 9, 12])
    # Start 2: token 0 ends there, so token 1 (chars 2-4) holds it -> 2 (reference) or 1.
    # Starts 3 and 5: tokens 1 and 2 hold them. 12 and 13: no token -> 4 (+1).
    got = number_boundaries([0, 2, 3, 5, 12, 13], token_ends)
    assert got.tolist() == [1, 2, 2, 3, 5, 5]
    assert got.dtype == np.int64
    at = number_boundaries([0, 2, 3, 5, 12, 13], token_ends, "at_first_token")
    assert at.tolist() == [0, 1, 1, 2, 4, 4]
    with pytest.raises(ValueError, match="boundary"):
        number_boundaries([0], token_ends, "later")  # type: ignore[arg-type]


def test_merge_walks_from_the_end() -> None:
    merged = merge_boundaries(np.array([1, 3, 10, 12, 13, 30]), 3)
    assert merged.tolist() == [3, 3, 10, 13, 13, 30]


def test_merge_chains_into_the_last_of_a_run() -> None:
    assert merge_boundaries(np.array([1, 2, 3, 4]), 3).tolist() == [1, 4, 4, 4]
    assert merge_boundaries(np.array([1, 2, 3, 4]), 0).tolist() == [1, 2, 3, 4]
    assert merge_boundaries(np.array([], dtype=np.int64), 5).tolist() == []


TOKENS = ["We", " have", " 3", " and", " 5", ",", " then", " 3", " again", " 7", " so", " 12"]


def test_path_repeated_number_makes_no_new_state_and_last_is_dropped() -> None:
    text, ends = tokenised(TOKENS)
    path = numca_path(text, ends, NumcaConfig(merge_distance=0))
    # 3 -> boundary 3, 5 -> 5, 3 again -> 8 (no new state), 7 -> 10, 12 dropped.
    assert path.boundaries.tolist() == [0, 3, 5, 10]
    assert path.states == (E, s("3"), s("3", "5"), s("3", "5", "7"))


def test_path_boundary_past_the_end_is_discarded() -> None:
    text, ends = tokenised(TOKENS)
    kept = numca_path(text, ends, NumcaConfig(merge_distance=0, drop_last_number=False))
    # "12" is in the last token: its boundary 12 equals the length, no token sees it; the
    # state it leads to is reached after the last token.
    assert kept.boundaries.tolist() == [0, 3, 5, 10]
    assert kept.final_state == s("3", "5", "7", "12")
    text, ends = tokenised([*TOKENS, " ."])
    kept = numca_path(text, ends, NumcaConfig(merge_distance=0, drop_last_number=False))
    assert kept.boundaries.tolist() == [0, 3, 5, 10, 12]
    assert kept.states[-1] == s("3", "5", "7", "12")
    dropped = numca_path(text, ends, NumcaConfig(merge_distance=0))
    assert dropped.boundaries.tolist() == [0, 3, 5, 10]


def test_path_with_merging() -> None:
    text, ends = tokenised(TOKENS)
    path = numca_path(text, ends, NumcaConfig(merge_distance=3))
    # [3, 5, 8, 10] merges to [5, 5, 10, 10].
    assert path.boundaries.tolist() == [0, 5, 10]
    assert path.states == (E, s("3", "5"), s("3", "5", "7"))


def test_path_decimal_vs_digits() -> None:
    text, ends = tokenised(["a", " 3.5", " b", " 3.50", " c", " 9", " d"])
    decimal = numca_path(text, ends, NumcaConfig(number_pattern="decimal", merge_distance=0))
    assert decimal.boundaries.tolist() == [0, 2]
    assert decimal.states == (E, s("3.5"))
    digits = numca_path(text, ends, NumcaConfig(merge_distance=0))
    assert digits.boundaries.tolist() == [0, 2, 4]
    assert digits.states == (E, s("3", "5"), s("3", "5", "50"))


def test_path_of_empty_and_number_free_responses() -> None:
    empty = numca_path("", np.array([], dtype=np.int64), NumcaConfig(merge_distance=0))
    assert empty.boundaries.tolist() == [] and empty.states == ()
    text, ends = tokenised(["hel", "lo"])
    plain = numca_path(text, ends, NumcaConfig(merge_distance=0))
    assert plain.boundaries.tolist() == [0] and plain.states == (E,)


def test_table_counts_each_state_once_per_path() -> None:
    table = NumcaTable()
    table.add((E, s("a"), s("a")), 1.0)
    # An empty response still counts for the empty set.
    path = numca_path("", np.zeros(0, dtype=np.int64), NumcaConfig(merge_distance=0))
    table.add(path.table_states("chain"), 3.0)
    assert table.count(E) == 2 and table.value(E) == 2.0
    assert table.count(s("a")) == 1 and table.value(s("a")) == 1.0
    assert table.count(s("b")) == 0 and table.value(s("b")) is None
    assert len(table) == 2


def path(boundaries: list[int], *states: frozenset[str]) -> NumcaPath:
    return NumcaPath(np.array(boundaries, dtype=np.int64), tuple(states))


# The cases below count the states a path is valued with and let a query's unseen state
# keep the previous value; the reference rules have their own cases further down.
PATH_RULES = NumcaConfig(table_states="path", unseen_state="previous")


def with_prior(count: float) -> NumcaConfig:
    return PATH_RULES.model_copy(update={"prior_count": count})


def test_table_accumulates_across_groups_of_one_prompt() -> None:
    table = NumcaTable()
    first = numca_values(
        [path([0, 2], E, s("a")), path([0, 1, 3], E, s("b"), s("a", "b")), path([0, 2], E, s("a"))],
        [4, 5, 3],
        np.array([1.0, 0.0, 0.5]),
        np.array([True, True, True]),
        table,
        PATH_RULES,
    )
    # Empty set: 1.5 / 3; {a}: 1.5 / 2; {b} and {a, b}: 0 / 1.
    np.testing.assert_allclose(first.values[0], [0.5, 0.5, 0.75, 0.75])
    np.testing.assert_allclose(first.values[1], [0.5, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(first.values[2], [0.5, 0.5, 0.75])
    assert first.values[0].dtype == np.float32
    assert first.boundaries[1].tolist() == [0, 1, 3]

    second = numca_values(
        [
            path([0, 1], E, s("b")),
            path([0, 2, 4], E, s("a"), s("a", "c")),
            path([0, 1, 2], E, s("a"), s("a", "d")),  # a query: reward ignored
        ],
        [2, 5, 4],
        np.array([1.0, 1.0, 100.0]),
        np.array([True, True, False]),
        table,
        PATH_RULES,
    )
    # Empty set: 3.5 / 5; {a}: 2.5 / 3; {b}: 1 / 2; {a, c}: 1 / 1; {a, d} never added.
    np.testing.assert_allclose(second.values[0], [0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(second.values[1], [0.7, 0.7, 2.5 / 3, 2.5 / 3, 1.0], rtol=1e-6)
    # The query's unseen {a, d} keeps the value of {a}, the last known state on its path.
    np.testing.assert_allclose(second.values[2], [0.7, 2.5 / 3, 2.5 / 3, 2.5 / 3], rtol=1e-6)
    assert table.count(E) == 5 and table.count(s("a", "d")) == 0
    assert len(table) == 5


def test_query_whose_first_state_is_unseen_keeps_the_empty_set_value() -> None:
    estimate = numca_values(
        [path([0], E), path([0, 1], E, s("z"))],
        [2, 3],
        np.array([0.25, 9.0]),
        np.array([True, False]),
        NumcaTable(),
        PATH_RULES,
    )
    np.testing.assert_allclose(estimate.values[1], [0.25, 0.25, 0.25])


def test_values_from_text() -> None:
    text, ends = tokenised(TOKENS)
    config = NumcaConfig(merge_distance=0)
    other_text, other_ends = tokenised(["So", " 3", " then", " 4", " ok"])
    paths = [numca_path(text, ends, config), numca_path(other_text, other_ends, config)]
    estimate = numca_values(
        paths, [12, 5], np.array([1.0, 0.0]), np.array([True, True]), NumcaTable(), PATH_RULES
    )
    # Shared: empty set (0.5) and {3} (0.5); the rest is seen by one response each.
    expected_first = [0.5] * 3 + [0.5] * 2 + [1.0] * 5 + [1.0] * 2
    np.testing.assert_allclose(estimate.values[0], expected_first)
    np.testing.assert_allclose(estimate.values[1], [0.5, 0.5, 0.5, 0.5, 0.5])
    assert estimate.boundaries[1].tolist() == [0, 2]


def test_values_check_paths() -> None:
    with pytest.raises(ValueError, match="paths"):
        numca_values([], [3], np.array([1.0]), np.array([True]), NumcaTable(), PATH_RULES)
    with pytest.raises(ValueError, match="inside"):
        numca_values(
            [path([0, 3], E, s("1"))],
            [3],
            np.array([1.0]),
            np.array([True]),
            NumcaTable(),
            PATH_RULES,
        )


def test_prior_count_shrinks_each_state_towards_its_parent() -> None:
    paths = [
        path([0, 2], E, s("a")),
        path([0, 1, 3], E, s("b"), s("a", "b")),
        path([0, 2], E, s("a")),
    ]
    args = ([4, 5, 3], np.array([1.0, 0.0, 0.5]), np.array([True, True, True]))
    estimate = numca_values(paths, *args, NumcaTable(), with_prior(1.0))
    # Empty set 0.5 (never shrunk); {a}: (2·0.75 + 0.5) / 3; {b}: (0 + 0.5) / 2 = 0.25;
    # {a, b}: (0 + 1·0.25) / 2, shrunk towards {b}'s shrunk value.
    a = (2 * 0.75 + 0.5) / 3
    np.testing.assert_allclose(estimate.values[0], [0.5, 0.5, a, a], rtol=1e-6)
    np.testing.assert_allclose(estimate.values[1], [0.5, 0.25, 0.25, 0.125, 0.125], rtol=1e-6)
    reference = numca_values(paths, *args, NumcaTable(), PATH_RULES)
    same = numca_values(paths, *args, NumcaTable(), with_prior(0.0))
    for got, want in zip(same.values, reference.values, strict=True):
        np.testing.assert_array_equal(got, want)
    table = NumcaTable()
    with pytest.raises(ValueError, match="prior_count"):
        read_numca_values(paths, args[0], table, prior_count=-1.0)
    assert len(table) == 0  # a rejected call leaves the table alone


def test_large_prior_count_approaches_the_group_mean() -> None:
    paths = [path([0, 1], E, s("a")), path([0, 1], E, s("b"))]
    estimate = numca_values(
        paths, [2, 2], np.array([1.0, 0.0]), np.array([True, True]), NumcaTable(), with_prior(1e9)
    )
    for values in estimate.values:
        np.testing.assert_allclose(values, [0.5, 0.5], atol=1e-6)


def test_a_relative_merge_distance_needs_the_group() -> None:
    text, ends = tokenised(["a", " 1", " b"])
    with pytest.raises(ValueError, match="group_merge_distance"):
        numca_path(text, ends, NumcaConfig(relative_merge_distance=0.1))
