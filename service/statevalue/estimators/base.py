"""The common result type of every value estimator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ValueEstimate:
    """Per-token state values of the rollouts of one group.

    ``values[i]`` holds ``len(response_i)`` float32 values; ``values[i][t]`` is
    V(prompt + response_i[:t]). ``boundaries[i]`` holds the sorted token indices where
    a new segment (a new estimated state) starts; it begins with 0 for a non-empty
    response and is empty for an empty one. Values are constant inside a segment.
    ``final_values[i]``, when given and not None, is the value of a state reached after
    the last token and before the reward (Numca: a number in the last token).
    """

    values: list[np.ndarray]
    boundaries: list[np.ndarray]
    final_values: list[float | None] | None = None
