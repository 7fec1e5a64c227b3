"""Numca: the numbers written so far in a response mark its state (docs/design.md, "Numca").

A response's state after a token is the set of distinct numbers it has written. A table
per prompt maps each state to the mean reward of the responses that passed through it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from statevalue.config import (
    NumberBoundary,
    NumberPattern,
    NumcaConfig,
    TableStates,
    UnseenState,
)
from statevalue.estimators._group import check_group, length_fraction, piecewise
from statevalue.estimators.base import ValueEstimate

_DIGITS = re.compile(r"\d+")
# One number each: "1,000" (thousands groups of exactly three digits), "3.5", "1/2", "2.5/7".
# A "." or "," not followed by digits (end of sentence, list separator) is not part of it.
_DECIMAL = re.compile(r"\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?")

_EMPTY: frozenset[str] = frozenset()


def _canonical_decimal(number: str) -> str:
    """One spelling per value of each part: "1,000" -> "1000", "03.50" -> "3.5", "2.0" -> "2".

    Fraction parts are canonicalised separately; "2/4" and "1/2" stay different numbers.
    """
    parts = []
    for part in number.replace(",", "").split("/"):
        whole, _, fraction = part.partition(".")
        whole = whole.lstrip("0") or "0"
        fraction = fraction.rstrip("0")
        parts.append(f"{whole}.{fraction}" if fraction else whole)
    return "/".join(parts)


def find_numbers(text: str, pattern: NumberPattern) -> list[tuple[int, str]]:
    """The numbers of ``text`` in order, as (start character offset, number).

    'digits' gives every maximal run of digits verbatim (the reference). 'decimal' gives
    integers, decimals and fractions as one number each, canonicalised (see
    ``_canonical_decimal``) so that equal values written differently are the same number.
    """
    if pattern == "digits":
        return [(m.start(), m.group()) for m in _DIGITS.finditer(text)]
    if pattern == "decimal":
        return [(m.start(), _canonical_decimal(m.group())) for m in _DECIMAL.finditer(text)]
    raise ValueError(f"unknown number pattern {pattern!r}")


def number_boundaries(
    number_starts: Sequence[int],
    token_ends: np.ndarray,
    rule: NumberBoundary = "after_first_token",
) -> np.ndarray:
    """Token index where the state holding each number starts.

    ``token_ends[t]`` is the character offset where token t ends. The token holding a
    number's first character is the first one ending after that character's offset.
    ``"after_first_token"`` (the reference): the state starts after that token;
    ``"at_first_token"``: at it. A number no token reaches gets ``len(token_ends)`` (+1).
    """
    ends = np.asarray(token_ends, dtype=np.int64)
    starts = np.asarray(number_starts, dtype=np.int64)
    holding = np.searchsorted(ends, starts, side="right").astype(np.int64)
    if rule == "after_first_token":
        return holding + 1
    if rule == "at_first_token":
        return holding
    raise ValueError(f"unknown number boundary rule {rule!r}")


def merge_boundaries(boundaries: np.ndarray, merge_distance: int) -> np.ndarray:
    """Move each boundary closer than ``merge_distance`` to the next one onto it.

    Walks from the end, so chains of close boundaries all merge into the last of the chain.
    The result has one entry per input boundary (merged numbers share a boundary).
    """
    merged = np.array(boundaries, dtype=np.int64)
    for k in range(len(merged) - 2, -1, -1):
        if merged[k + 1] - merged[k] < merge_distance:
            merged[k] = merged[k + 1]
    return merged


@dataclass(frozen=True)
class NumcaPath:
    """The states one response passes through.

    ``states[k]`` (the set of distinct numbers seen so far) holds from token
    ``boundaries[k]`` to the next boundary; the first state holds from token 0.
    ``final_state`` is the state a number in the last token leads to: it is reached after
    the last token and before the reward (None when there is none). ``chain`` holds the
    empty set and every distinct-number prefix of the response's numbers before merging,
    the states the reference counts the response in.
    """

    boundaries: np.ndarray
    states: tuple[frozenset[str], ...]
    final_state: frozenset[str] | None = None
    chain: tuple[frozenset[str], ...] = (_EMPTY,)

    @property
    def read(self) -> tuple[frozenset[str], ...]:
        """The states valuing this response reads: the empty set, its states, its final."""
        final = () if self.final_state is None else (self.final_state,)
        return (_EMPTY, *self.states, *final)

    def table_states(self, rule: TableStates) -> tuple[frozenset[str], ...]:
        """The states this response counts in under ``rule`` (each once)."""
        if rule == "chain":
            return tuple(dict.fromkeys(self.chain))
        if rule == "path":
            return tuple(dict.fromkeys(self.read))
        raise ValueError(f"unknown table_states rule {rule!r}")


def group_merge_distance(
    lengths: Sequence[int], rewarded: np.ndarray, config: NumcaConfig
) -> NumcaConfig:
    """``config`` with one group's merge distance fixed.

    A relative distance becomes ``relative_merge_distance`` × the median length of the
    group's rewarded responses, rounded, between 0 and ``merge_distance``; a fixed distance
    is returned unchanged.
    """
    if config.relative_merge_distance == 0:
        return config
    distance = length_fraction(
        lengths, rewarded, config.relative_merge_distance, 0, config.merge_distance
    )
    return config.model_copy(update={"merge_distance": distance, "relative_merge_distance": 0.0})


def numca_path(text: str, token_ends: np.ndarray, config: NumcaConfig) -> NumcaPath:
    """Segment a response by its numbers; ``token_ends[t]`` = character end of token t in text.

    A relative merge distance must be fixed first, for the whole group
    (:func:`group_merge_distance`).
    """
    if config.relative_merge_distance:
        raise ValueError("a relative merge distance needs the group: use group_merge_distance")
    length = len(token_ends)
    numbers = find_numbers(text, config.number_pattern)
    if config.drop_last_number:
        numbers = numbers[:-1]
    chain = [_EMPTY]
    seen: set[str] = set()
    for _, number in numbers:
        if number not in seen:
            seen.add(number)
            chain.append(frozenset(seen))
    if length == 0:
        return NumcaPath(np.zeros(0, dtype=np.int64), (), None, tuple(chain))
    positions = merge_boundaries(
        number_boundaries([start for start, _ in numbers], token_ends, config.number_boundary),
        config.merge_distance,
    )
    starts = [0]
    states = [_EMPTY]
    final: frozenset[str] | None = None
    seen = set()
    # Boundaries are sorted (merging keeps the order), so numbers are taken in order.
    for position, (_, number) in zip(positions.tolist(), numbers, strict=True):
        if number in seen:
            continue
        seen.add(number)
        state = frozenset(seen)
        if position >= length:
            final = state  # reached after the last token
        elif starts[-1] == position:
            states[-1] = state  # several numbers share this boundary
        else:
            starts.append(position)
            states.append(state)
    return NumcaPath(np.array(starts, dtype=np.int64), tuple(states), final, tuple(chain))


class NumcaTable:
    """Count and reward sum per state (set of numbers) for one prompt.

    Not thread-safe: the caller serialises access to a shared table.
    """

    def __init__(self) -> None:
        self._stats: dict[frozenset[str], list[float]] = {}

    @classmethod
    def from_stats(cls, stats: Mapping[frozenset[str], tuple[int, float]]) -> NumcaTable:
        """A table holding the given (count, reward sum) per state, e.g. read from a store."""
        table = cls()
        for state, (count, total) in stats.items():
            table._stats[state] = [count, total]
        return table

    def add(self, states: Sequence[frozenset[str]], reward: float) -> None:
        """Count one response in each of ``states`` (a repeated state counts once)."""
        for state in dict.fromkeys(states):
            stats = self._stats.setdefault(state, [0, 0.0])
            stats[0] += 1
            stats[1] += reward

    def value(self, state: frozenset[str]) -> float | None:
        """Mean reward of the responses counted in ``state``; None if none was."""
        stats = self._stats.get(state)
        return None if stats is None else stats[1] / stats[0]

    def count(self, state: frozenset[str]) -> int:
        """How many responses were counted in ``state``."""
        stats = self._stats.get(state)
        return 0 if stats is None else int(stats[0])

    def __len__(self) -> int:
        return len(self._stats)


def check_paths(paths: Sequence[NumcaPath], lengths: Sequence[int]) -> None:
    """Raise ValueError unless each path fits its response length."""
    if len(paths) != len(lengths):
        raise ValueError(f"{len(paths)} paths for {len(lengths)} rollouts")
    for path, length in zip(paths, lengths, strict=True):
        if len(path.boundaries) != len(path.states) or (len(path.boundaries) == 0) != (length == 0):
            raise ValueError("a path must have one state per boundary, and none iff length 0")
        if length and (path.boundaries[0] != 0 or path.boundaries[-1] >= length):
            raise ValueError("path boundaries must start at 0 and lie inside the response")


def table_rows(
    paths: Sequence[NumcaPath], rewards: np.ndarray, rewarded: np.ndarray, rule: TableStates
) -> list[tuple[tuple[frozenset[str], ...], float]]:
    """What a group adds to its table: (states counted, reward) per rewarded response."""
    return [
        (path.table_states(rule), float(reward))
        for path, reward, has_reward in zip(paths, rewards, rewarded, strict=True)
        if has_reward
    ]


def add_to_table(
    table: NumcaTable,
    paths: Sequence[NumcaPath],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    rule: TableStates,
) -> None:
    """Count every rewarded response of a group in ``table`` (queries add nothing)."""
    for states, reward in table_rows(paths, rewards, rewarded, rule):
        table.add(states, reward)


def read_numca_values(
    paths: Sequence[NumcaPath],
    lengths: Sequence[int],
    table: NumcaTable,
    unseen_state: UnseenState = "zero",
    prior_count: float = 0.0,
) -> ValueEstimate:
    """Every token's value from ``table``, which must already hold the batch.

    A state the table never saw (only a query can reach one) reads 0.0 (``"zero"``, the
    reference) or the value of the state before it (``"previous"``). With ``prior_count``
    m > 0 a state seen by n responses with mean reward v gets (n·v + m·V(parent)) / (n + m),
    V(parent) being the value of the previous state on the path: a state only one or two
    responses reached no longer echoes their rewards. m = 0 is the reference rule.
    """
    if prior_count < 0:
        raise ValueError("prior_count must be >= 0")
    check_paths(paths, lengths)
    values, finals = [], []
    for path, length in zip(paths, lengths, strict=True):
        empty = table.value(_EMPTY)
        known = 0.0 if empty is None else empty
        segment_values = []
        for state in (*path.states, *(() if path.final_state is None else (path.final_state,))):
            value = table.value(state)
            if value is None:
                value = 0.0 if unseen_state == "zero" else known
            elif state != _EMPTY and prior_count:
                count = table.count(state)
                value = (count * value + prior_count * known) / (count + prior_count)
            known = value
            segment_values.append(value)
        if path.final_state is not None:
            finals.append(segment_values.pop())
        else:
            finals.append(None)
        values.append(piecewise(path.boundaries, np.array(segment_values), length))
    return ValueEstimate(
        values=values, boundaries=[path.boundaries for path in paths], final_values=finals
    )


def numca_values(
    paths: Sequence[NumcaPath],
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    table: NumcaTable,
    config: NumcaConfig,
) -> ValueEstimate:
    """One group: add its rewarded paths to ``table`` (mutating it), then read every value."""
    rewards, rewarded, _ = check_group(lengths, rewards, rewarded)
    check_paths(paths, lengths)
    if config.prior_count < 0:
        raise ValueError("prior_count must be >= 0")
    add_to_table(table, paths, rewards, rewarded, config.table_states)
    return read_numca_values(paths, lengths, table, config.unseen_state, config.prior_count)
