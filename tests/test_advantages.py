"""Advantages: segment GAE, token GAE and reward-std scaling, on hand-computed cases."""

import numpy as np
import pytest

from statevalue.estimators import scale_advantages, segment_gae, token_gae

VALUES = np.array([0.2, 0.2, 0.5, 0.5, 0.5, 0.9], dtype=np.float32)
BOUNDARIES = np.array([0, 2, 5])


def test_segment_gae_lambda_one_is_reward_minus_segment_start() -> None:
    got = segment_gae(VALUES, BOUNDARIES, 1.0, 1.0)
    np.testing.assert_allclose(got, [0.8, 0.8, 0.5, 0.5, 0.5, 0.1], rtol=1e-6)
    assert got.dtype == np.float32


def test_segment_gae_lambda_half() -> None:
    # δ = (0.3, 0.4, 0.1); A2 = 0.1, A1 = 0.4 + 0.05, A0 = 0.3 + 0.5·0.45.
    got = segment_gae(VALUES, BOUNDARIES, 1.0, 0.5)
    np.testing.assert_allclose(got, [0.525, 0.525, 0.45, 0.45, 0.45, 0.1], rtol=1e-6)
    np.testing.assert_allclose(
        segment_gae(VALUES, BOUNDARIES, 1.0, 0.0), [0.3, 0.3, 0.4, 0.4, 0.4, 0.1], rtol=1e-6
    )


def test_segment_gae_query_bootstraps_from_its_last_value() -> None:
    got = segment_gae(VALUES, BOUNDARIES, None, 1.0)
    np.testing.assert_allclose(got, [0.7, 0.7, 0.4, 0.4, 0.4, 0.0], atol=1e-6)


def test_segment_gae_token_rewards_replace_the_reward() -> None:
    token_rewards = np.array([0.0, -0.1, 0.0, 0.0, -0.1, 1.0])
    # Segment rewards (-0.1, -0.1, 1.0): δ = (0.2, 0.3, 0.1).
    got = segment_gae(VALUES, BOUNDARIES, 5.0, 1.0, token_rewards)
    np.testing.assert_allclose(got, [0.6, 0.6, 0.4, 0.4, 0.4, 0.1], rtol=1e-5)


def test_segment_gae_edge_cases() -> None:
    empty = segment_gae(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64), 1.0, 1.0)
    assert empty.shape == (0,) and empty.dtype == np.float32
    with pytest.raises(ValueError, match="boundaries"):
        segment_gae(VALUES, np.array([1, 3]), 1.0, 1.0)
    with pytest.raises(ValueError, match="token_rewards"):
        segment_gae(VALUES, BOUNDARIES, 1.0, 1.0, np.zeros(2))


def test_token_gae_by_hand() -> None:
    values = np.array([0.5, 0.25, 0.75])
    # δ = (0.9·0.25 − 0.5, 0.9·0.75 − 0.25, 1 − 0.75) = (−0.275, 0.425, 0.25); γλ = 0.45.
    got = token_gae(values, 1.0, 0.9, 0.5)
    np.testing.assert_allclose(got, [-0.275 + 0.45 * 0.5375, 0.5375, 0.25], rtol=1e-6)
    assert got.dtype == np.float32
    np.testing.assert_allclose(token_gae(values, 1.0, 1.0, 1.0), [0.5, 0.75, 0.25], rtol=1e-6)


def test_token_gae_query_and_token_rewards() -> None:
    values = np.array([0.5, 0.25, 0.75])
    np.testing.assert_allclose(token_gae(values, None, 1.0, 1.0), [0.25, 0.5, 0.0], atol=1e-7)
    got = token_gae(values, 1.0, 1.0, 1.0, np.array([0.1, 0.0, 0.9]))
    np.testing.assert_allclose(got, [0.5, 0.65, 0.15], rtol=1e-6)
    assert token_gae(np.zeros(0), 1.0, 1.0, 1.0).shape == (0,)


ADVANTAGES = [np.array([1.0, -2.0], dtype=np.float32) for _ in range(5)]
REWARDS = np.array([1.0, 0.0, 99.0, 2.0, 50.0])
REWARDED = np.array([True, True, False, True, False])
GROUPS = np.array([0, 0, 0, 1, 1])


def test_scale_by_group_std() -> None:
    got = scale_advantages(ADVANTAGES, REWARDS, REWARDED, GROUPS, "group", 1e-4)
    # Group 0: std(1, 0) = sqrt(0.5), the query included; group 1 has one reward: std 1.
    group0 = 1 / (np.sqrt(0.5) + 1e-4)
    for a in got[:3]:
        np.testing.assert_allclose(a, [group0, -2 * group0], rtol=1e-6)
    for a in got[3:]:
        np.testing.assert_allclose(a, [1 / 1.0001, -2 / 1.0001], rtol=1e-6)
    assert all(a.dtype == np.float32 for a in got)


def test_scale_by_batch_std() -> None:
    got = scale_advantages(ADVANTAGES, REWARDS, REWARDED, GROUPS, "batch", 0.5)
    # Rewarded (1, 0, 2): mean 1, unbiased variance 1 -> divide by 1.5.
    for a in got:
        np.testing.assert_allclose(a, [1 / 1.5, -2 / 1.5], rtol=1e-6)
    single = scale_advantages(ADVANTAGES[:1], np.array([3.0]), np.array([True]), [0], "batch", 0)
    np.testing.assert_allclose(single[0], [1.0, -2.0])


def test_scale_none_and_errors() -> None:
    got = scale_advantages(ADVANTAGES, REWARDS, REWARDED, GROUPS, "none", 1e-4)
    assert all(a is b for a, b in zip(got, ADVANTAGES, strict=True))
    with pytest.raises(ValueError, match="rewarded"):
        scale_advantages(ADVANTAGES[:1], np.array([1.0]), np.array([False]), [0], "group", 0)
    with pytest.raises(ValueError, match="one entry"):
        scale_advantages(ADVANTAGES, REWARDS[:2], REWARDED, GROUPS, "group", 0)
