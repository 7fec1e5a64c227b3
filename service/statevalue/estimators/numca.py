"""Numca: the numbers written so far in a response mark its state (DESIGN §3.2).

A response's state after a token is the set of distinct numbers it has written. A table
per prompt maps each state to the mean reward of the responses that passed through it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from statevalue.config import NumberPattern, NumcaConfig
from statevalue.estimators._group import check_group, piecewise
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


def number_boundaries(number_starts: Sequence[int], token_ends: np.ndarray) -> np.ndarray:
    """Boundary of each number: 1 + index of the first token ending at or after its start.

    A token that ends exactly where the number begins is thus the token before the number.
    A number no token reaches gets ``len(token_ends) + 1``.
    """
    ends = np.asarray(token_ends, dtype=np.int64)
    starts = np.asarray(number_starts, dtype=np.int64)
    return (np.searchsorted(ends, starts, side="left") + 1).astype(np.int64)


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
    ``boundaries[k]`` to the next boundary; the first state is the empty set from token 0.
    """

    boundaries: np.ndarray
    states: tuple[frozenset[str], ...]


def numca_path(text: str, token_ends: np.ndarray, config: NumcaConfig) -> NumcaPath:
    """Segment a response by its numbers; ``token_ends[t]`` = character end of token t in text."""
    length = len(token_ends)
    if length == 0:
        return NumcaPath(np.zeros(0, dtype=np.int64), ())
    numbers = find_numbers(text, config.number_pattern)
    if config.drop_last_number:
        numbers = numbers[:-1]
    positions = merge_boundaries(
        number_boundaries([start for start, _ in numbers], token_ends), config.merge_distance
    )
    starts = [0]
    states = [_EMPTY]
    seen: set[str] = set()
    # Boundaries are sorted (merging keeps the order), so numbers are taken in order.
    for position, (_, number) in zip(positions.tolist(), numbers, strict=True):
        if position >= length:
            break  # no token is generated in this state
        if number in seen:
            continue
        seen.add(number)
        if starts[-1] == position:
            states[-1] = frozenset(seen)  # several numbers share this boundary
        else:
            starts.append(position)
            states.append(frozenset(seen))
    return NumcaPath(np.array(starts, dtype=np.int64), tuple(states))


class NumcaTable:
    """Count and reward sum per state (set of numbers) for one prompt.

    Not thread-safe: the caller serialises access to a shared table.
    """

    def __init__(self) -> None:
        self._stats: dict[frozenset[str], list[float]] = {}

    def add(self, path_states: Sequence[frozenset[str]], reward: float) -> None:
        """Count one response: the empty set and each distinct state on its path, once each."""
        for state in dict.fromkeys([_EMPTY, *path_states]):
            stats = self._stats.setdefault(state, [0, 0.0])
            stats[0] += 1
            stats[1] += reward

    def value(self, state: frozenset[str]) -> float | None:
        """Mean reward of the responses that passed through ``state``; None if none did."""
        stats = self._stats.get(state)
        return None if stats is None else stats[1] / stats[0]

    def count(self, state: frozenset[str]) -> int:
        """How many responses passed through ``state``."""
        stats = self._stats.get(state)
        return 0 if stats is None else int(stats[0])

    def __len__(self) -> int:
        return len(self._stats)


def numca_values(
    paths: Sequence[NumcaPath],
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    table: NumcaTable,
    prior_count: float = 0.0,
) -> ValueEstimate:
    """Add the group's rewarded paths to ``table`` (mutating it), then read every token's value.

    A state the table never saw (only a query rollout can have one) keeps the value of the
    previous state on its path. With ``prior_count`` m > 0 a state seen by n responses with
    mean reward v gets (n·v + m·V(parent)) / (n + m), V(parent) being the value of the
    previous state on the path (the empty set's is the table's mean): a state only one or
    two responses reached no longer echoes their rewards. m = 0 is the reference rule.
    """
    rewards, rewarded, _ = check_group(lengths, rewards, rewarded)
    if prior_count < 0:
        raise ValueError("prior_count must be >= 0")
    if len(paths) != len(lengths):
        raise ValueError(f"{len(paths)} paths for {len(lengths)} rollouts")
    for path, length in zip(paths, lengths, strict=True):
        if len(path.boundaries) != len(path.states) or (len(path.boundaries) == 0) != (length == 0):
            raise ValueError("a path must have one state per boundary, and none iff length 0")
        if length and (path.boundaries[0] != 0 or path.boundaries[-1] >= length):
            raise ValueError("path boundaries must start at 0 and lie inside the response")
    for path, reward, has_reward in zip(paths, rewards, rewarded, strict=True):
        if has_reward:
            table.add(path.states, float(reward))
    values = []
    for path, length in zip(paths, lengths, strict=True):
        known = table.value(_EMPTY)
        segment_values = []
        for state in path.states:
            value = table.value(state)
            if value is not None and state != _EMPTY:
                count = table.count(state)
                value = (count * value + prior_count * known) / (count + prior_count)
            known = known if value is None else value
            segment_values.append(known)
        values.append(piecewise(path.boundaries, np.array(segment_values), length))
    return ValueEstimate(values=values, boundaries=[path.boundaries for path in paths])
