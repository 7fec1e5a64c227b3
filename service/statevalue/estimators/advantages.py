"""Advantages from per-token values: segment or token GAE, then reward-std scaling.

A rollout with a reward (or token rewards) is terminal: the value after its last token is
0. A query rollout has neither: it bootstraps from its own last value and gets no reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from statevalue.config import ScaleMode


def _rewards(
    length: int, terminal_reward: float | None, token_rewards: np.ndarray | None
) -> tuple[np.ndarray, bool]:
    """Per-token rewards and whether the rollout is terminal; token rewards replace the reward."""
    if token_rewards is not None:
        rewards = np.asarray(token_rewards, dtype=np.float64)
        if rewards.shape != (length,):
            raise ValueError(f"token_rewards has shape {rewards.shape}, expected ({length},)")
        return rewards, True
    rewards = np.zeros(length)
    if terminal_reward is not None and length:
        rewards[-1] = terminal_reward
    return rewards, terminal_reward is not None


def _reverse_discounted_sum(deltas: np.ndarray, factor: float, tail: float = 0.0) -> np.ndarray:
    """A_k = deltas_k + factor·A_{k+1}, A past the end = ``tail`` (one O(n) reverse pass)."""
    out = np.empty(len(deltas))
    running = tail
    for k, delta in zip(range(len(deltas) - 1, -1, -1), deltas[::-1].tolist(), strict=True):
        running = delta + factor * running
        out[k] = running
    return out


def segment_gae(
    values: np.ndarray,
    boundaries: np.ndarray,
    terminal_reward: float | None,
    lam: float,
    token_rewards: np.ndarray | None = None,
    final_value: float | None = None,
) -> np.ndarray:
    """GAE over segments (the reference): every token of segment k gets A_k.

    δ_k = (rewards inside segment k) + V(next segment start) − V(segment start), the value
    after the last segment being 0 for a terminal rollout; A_k = δ_k + lam·A_{k+1}. With a
    reward and lam = 1 this is A = R − V(segment start).

    ``final_value`` is the value of a state reached after the last token and before its
    reward: the last segment then ends in that state (δ = V_final − V(start), the last
    token's reward excluded) and a segment of no tokens follows with δ = r_last − V_final.
    A query bootstraps from it instead of from its last value.
    """
    values = np.asarray(values, dtype=np.float64)
    length = len(values)
    rewards, terminal = _rewards(length, terminal_reward, token_rewards)
    if length == 0:
        return np.zeros(0, dtype=np.float32)
    starts = np.asarray(boundaries, dtype=np.int64)
    if len(starts) == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= length:
        raise ValueError("boundaries must increase from 0 and lie inside the response")
    start_values = values[starts]
    tail = 0.0
    if not terminal:
        after_last = values[-1] if final_value is None else final_value
    elif final_value is None:
        after_last = 0.0
    else:
        after_last = final_value
        tail = rewards[-1] - final_value
        rewards = np.append(rewards[:-1], 0.0)
    deltas = (
        np.add.reduceat(rewards, starts) + np.append(start_values[1:], after_last) - start_values
    )
    advantages = _reverse_discounted_sum(deltas, lam, tail)
    return np.repeat(advantages, np.diff(np.append(starts, length))).astype(np.float32)


def token_gae(
    values: np.ndarray,
    terminal_reward: float | None,
    gamma: float,
    lam: float,
    token_rewards: np.ndarray | None = None,
) -> np.ndarray:
    """Classic per-token GAE: δ_t = r_t + γ·V_{t+1} − V_t, A_t = δ_t + γλ·A_{t+1}.

    r is 0 except the reward on the last token (or the given token rewards); V_T = 0 for a
    terminal rollout, the last value for a query.
    """
    values = np.asarray(values, dtype=np.float64)
    length = len(values)
    rewards, terminal = _rewards(length, terminal_reward, token_rewards)
    if length == 0:
        return np.zeros(0, dtype=np.float32)
    next_values = np.append(values[1:], 0.0 if terminal else values[-1])
    deltas = rewards + gamma * next_values - values
    return _reverse_discounted_sum(deltas, gamma * lam).astype(np.float32)


@dataclass(frozen=True)
class RewardStatistics:
    """Count, mean and sum of squared deviations of a set of rewards: enough for their std,
    and mergeable, so a step split into requests can send its whole batch's statistics."""

    count: int
    mean: float
    sum_squared_deviations: float

    @classmethod
    def of(cls, rewards: np.ndarray) -> RewardStatistics:
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(rewards) == 0:
            raise ValueError("scaling needs at least one rewarded rollout per group")
        mean = float(rewards.mean())
        return cls(len(rewards), mean, float(((rewards - mean) ** 2).sum()))

    @property
    def std(self) -> float:
        """Unbiased std; 1.0 for a single reward (it carries no spread)."""
        if self.count < 2:
            return 1.0
        return float(np.sqrt(self.sum_squared_deviations / (self.count - 1)))


def scale_advantages(
    advantages: list[np.ndarray],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    group_index: np.ndarray,
    mode: ScaleMode,
    eps: float,
    batch: RewardStatistics | None = None,
) -> list[np.ndarray]:
    """Divide each rollout's advantages by (reward std + eps) of its group or of the batch.

    Only rewarded rollouts enter the std; queries are scaled like their group's rollouts.
    ``batch``: the statistics of the whole batch when these rollouts are only part of it
    (a step split into requests); by default the batch is these rollouts.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    rewarded = np.asarray(rewarded, dtype=bool)
    group_index = np.asarray(group_index)
    if not len(advantages) == len(rewards) == len(rewarded) == len(group_index):
        raise ValueError("advantages, rewards, rewarded and group_index need one entry per rollout")
    if mode == "none":
        return list(advantages)
    if mode == "batch":
        stats = batch if batch is not None else RewardStatistics.of(rewards[rewarded])
        scale = np.full(len(rewards), stats.std + eps)
    elif mode == "group":
        scale = np.empty(len(rewards))
        for group in np.unique(group_index):
            members = group_index == group
            scale[members] = RewardStatistics.of(rewards[members & rewarded]).std + eps
    else:
        raise ValueError(f"unknown scale mode {mode!r}")
    return [
        (np.asarray(a, dtype=np.float64) / s).astype(np.float32)
        for a, s in zip(advantages, scale, strict=True)
    ]
