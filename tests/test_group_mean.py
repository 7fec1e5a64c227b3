"""Group mean baseline: every token gets the mean reward of the rewarded rollouts."""

import numpy as np
import pytest

from statevalue.estimators import group_mean_values


def test_every_token_gets_the_rewarded_mean() -> None:
    estimate = group_mean_values(
        [3, 0, 2], np.array([1.0, 5.0, 100.0]), np.array([True, True, False])
    )
    assert [v.tolist() for v in estimate.values] == [[3.0, 3.0, 3.0], [], [3.0, 3.0]]
    assert all(v.dtype == np.float32 for v in estimate.values)
    assert [b.tolist() for b in estimate.boundaries] == [[0], [], [0]]
    assert all(b.dtype == np.int64 for b in estimate.boundaries)


def test_needs_a_rewarded_rollout() -> None:
    with pytest.raises(ValueError, match="rewarded"):
        group_mean_values([2], np.array([1.0]), np.array([False]))


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        group_mean_values([2, 3], np.array([1.0]), np.array([True]))
