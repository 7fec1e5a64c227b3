"""Checks and helpers shared by the estimators of one group."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def check_group(
    lengths: Sequence[int], rewards: np.ndarray, rewarded: np.ndarray
) -> tuple[np.ndarray, np.ndarray, float]:
    """Validate a group; return (rewards as float64, rewarded as bool, mean rewarded reward)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    rewarded = np.asarray(rewarded, dtype=bool)
    if rewards.shape != (len(lengths),) or rewarded.shape != (len(lengths),):
        raise ValueError(
            f"rewards {rewards.shape} and rewarded {rewarded.shape} must have shape "
            f"({len(lengths)},), one entry per rollout"
        )
    if any(length < 0 for length in lengths):
        raise ValueError("response lengths must be >= 0")
    if not rewarded.any():
        raise ValueError("a group needs at least one rewarded rollout")
    return rewards, rewarded, float(rewards[rewarded].mean())


def length_fraction(
    lengths: Sequence[int], rewarded: np.ndarray, fraction: float, lower: int, upper: int
) -> int:
    """``fraction`` × the median length of the rewarded responses, rounded half up and
    kept within [lower, upper].

    Only rewarded responses count, so that a query never changes the other rollouts'
    values.
    """
    kept = np.asarray(lengths, dtype=np.float64)[np.asarray(rewarded, dtype=bool)]
    if not kept.size:
        raise ValueError("a group needs at least one rewarded rollout")
    # Clamped before rounding: a huge fraction gives inf, which no int can hold.
    scaled = float(fraction) * float(np.median(kept)) + 0.5
    return math.floor(min(max(scaled, lower), upper))


def start_boundaries(length: int) -> np.ndarray:
    """Boundaries of a single-segment response: [0], or empty for an empty response."""
    return np.zeros(1 if length > 0 else 0, dtype=np.int64)


def piecewise(boundaries: np.ndarray, segment_values: np.ndarray, length: int) -> np.ndarray:
    """Expand one value per segment to float32 token values; segment k starts at boundaries[k]."""
    ends = np.append(boundaries[1:], length)
    return np.repeat(np.asarray(segment_values, dtype=np.float32), ends - boundaries)
