"""Prototypes of estimator changes, measured in the benchmark before they enter the engine.

- ``hista_relative_values``: Hista with ``d_min`` set per group to a fraction of the
  group's own distance scale (the median Chamfer distance between its complete rollouts),
  so the clamp means the same thing on every model whatever its hidden-state norms.
- ``numca_shrunk_values``: Numca where a state's value is shrunk towards its parent's
  (the previous state on the path) by visit count: V(S) = (n_S·mean_S + m·V(parent)) /
  (n_S + m). States seen by one or two rollouts stop echoing their own reward.

Both reuse the engine's public estimator functions; nothing here changes ``service/``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from statevalue.config import HistaConfig, NumcaConfig
from statevalue.estimators import (
    NumcaTable,
    ema_smooth,
    hista_values,
    numca_path,
)
from statevalue.estimators._group import piecewise
from statevalue.tokenization import TokenText


def _representation(hidden: torch.Tensor, alpha: float, stride: int) -> torch.Tensor:
    """Smoothed hidden states of one sequence, every ``stride``-th kept (as Hista does)."""
    smoothed = ema_smooth(hidden.float(), alpha)
    reps = smoothed[stride - 1 :: stride]
    return reps if len(reps) else smoothed[-1:]


def group_distance_scale(hidden: Sequence[torch.Tensor], config: HistaConfig) -> float:
    """Median, over ordered pairs of different rollouts, of their complete-prefix distance.

    The distance is Hista's one-sided Chamfer distance (mean over the longer sequence's
    vectors of the distance to the nearest vector of the other), prompt included.
    """
    reps = [_representation(h, config.ema_alpha, config.stride) for h in hidden]
    distances = []
    for i, a in enumerate(reps):
        for j, b in enumerate(reps):
            if i == j:
                continue
            longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
            distances.append(float(torch.cdist(longer, shorter).min(dim=1).values.mean()))
    return float(np.median(distances)) if distances else 1.0


def hista_relative_values(
    hidden: Sequence[torch.Tensor],
    prompt_len: int,
    lengths: Sequence[int],
    rewards: np.ndarray,
    config: HistaConfig,
    relative_d_min: float,
    scale: float | None = None,
) -> tuple[list[np.ndarray], float]:
    """Hista values with d_min = relative_d_min × the group's distance scale; and that d_min.

    ``scale`` is ``group_distance_scale(hidden, config)``, computed here when not given.
    """
    if scale is None:
        scale = group_distance_scale(hidden, config)
    d_min = max(1e-6, relative_d_min * scale)
    estimate = hista_values(
        hidden,
        prompt_len,
        lengths,
        np.asarray(rewards, dtype=np.float64),
        np.ones(len(lengths), dtype=bool),
        config.model_copy(update={"d_min": d_min}),
    )
    return estimate.values, d_min


def numca_shrunk_values(
    token_text: TokenText,
    responses: Sequence[np.ndarray],
    rewards: Sequence[float],
    config: NumcaConfig,
    prior_count: float,
) -> list[np.ndarray]:
    """Numca values of one group, each state shrunk towards its parent's by visit count.

    ``prior_count`` = m pseudo-visits at the parent's value; m = 0 is plain Numca. The
    empty set (every rollout passes through it) is the group mean.
    """
    paths = [numca_path(*token_text.decode_with_offsets(r), config) for r in responses]
    table = NumcaTable()
    for path, reward in zip(paths, rewards, strict=True):
        table.add(path.states, float(reward))
    values = []
    for path, response in zip(paths, responses, strict=True):
        segment_values: list[float] = []
        for state in path.states:
            count = table.count(state)
            mean = table.value(state)
            if not segment_values:
                segment_values.append(float(mean if mean is not None else np.mean(rewards)))
                continue
            parent = segment_values[-1]
            if mean is None:
                segment_values.append(parent)
            else:
                segment_values.append((count * mean + prior_count * parent) / (count + prior_count))
        values.append(piecewise(path.boundaries, np.array(segment_values), len(response)))
    return values
