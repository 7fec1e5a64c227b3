"""Group mean (GRPO) baseline: every token's value is the mean reward of the group."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from statevalue.estimators._group import check_group, start_boundaries
from statevalue.estimators.base import ValueEstimate


def group_mean_values(
    lengths: Sequence[int], rewards: np.ndarray, rewarded: np.ndarray
) -> ValueEstimate:
    """V = mean reward of the rewarded rollouts, for every token of every rollout."""
    _, _, mean = check_group(lengths, rewards, rewarded)
    return ValueEstimate(
        values=[np.full(length, mean, dtype=np.float32) for length in lengths],
        boundaries=[start_boundaries(length) for length in lengths],
    )
