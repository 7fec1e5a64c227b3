"""How long a forward micro-batch takes: ``seconds = overhead + per_token × tokens``.

Admission, queue-wait estimates and the size of each micro-batch all come from this one
model. It is fitted by least squares over the most recent micro-batches, so it follows
the machine as its load changes (another process taking the CPU, several requests
contending), and it is per token, so a run of tiny batches whose time is mostly fixed
overhead does not make big requests look cheap, nor the other way round. Before the
first real batch, the server's warm-up (two batch sizes) gives the prior.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

# Micro-batches the fit looks back over: a few tens of seconds of work at the default
# micro-batch time, so a change of load shows within a minute.
WINDOW = 24

# Below this spread of sizes (largest / smallest) the window cannot tell overhead from
# per-token time; the last line that could is scaled to the window's times instead.
_MIN_SPREAD = 1.5


class ForwardTimeModel:
    """A line ``seconds = overhead + per_token * tokens`` fitted to recent micro-batches."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)
        # The last line fitted over a window with enough spread of sizes: the shape that a
        # window of like-sized batches is scaled by.
        self._shape: tuple[float, float] | None = None
        self.overhead = 0.0
        self.per_token: float | None = None

    @property
    def ready(self) -> bool:
        """Whether at least one micro-batch has been measured."""
        return self.per_token is not None

    def add(self, tokens: int, seconds: float) -> None:
        """Fold in one measured micro-batch of ``tokens`` tokens that took ``seconds``."""
        if tokens <= 0 or not (seconds > 0 and math.isfinite(seconds)):
            return
        self._samples.append((float(tokens), seconds))
        self._fit()

    def seconds(self, tokens: float) -> float:
        """Predicted time of one micro-batch of ``tokens`` tokens (0 before any sample)."""
        if self.per_token is None or tokens <= 0:
            return 0.0
        return self.overhead + self.per_token * tokens

    @property
    def typical_tokens(self) -> float:
        """The mean size of the micro-batches in the window (0 before any)."""
        if not self._samples:
            return 0.0
        return sum(n for n, _ in self._samples) / len(self._samples)

    def tokens_within(self, seconds: float, at_most: int) -> int:
        """The most tokens one micro-batch can take in ``seconds`` (1 to ``at_most``)."""
        if self.per_token is None:
            return at_most
        return int(min(max((seconds - self.overhead) / self.per_token, 1), at_most))

    def _fit(self) -> None:
        sizes = np.array([n for n, _ in self._samples])
        times = np.array([t for _, t in self._samples])
        if sizes.max() >= _MIN_SPREAD * sizes.min():
            per_token, overhead = np.polyfit(sizes, times, 1)
            if per_token > 0 and overhead >= 0:
                self._set(overhead, per_token, shape=True)
                return
            if per_token > 0:
                # Overhead cannot be negative: the best line through the origin.
                self._set(0.0, float(sizes @ times / (sizes @ sizes)), shape=True)
                return
        if self._shape is None:
            # No shape yet: all of the time is per token (it errs towards slower).
            self._set(0.0, float(times.sum() / sizes.sum()), shape=False)
            return
        overhead, per_token = self._shape
        scale = times.sum() / (len(sizes) * overhead + per_token * sizes.sum())
        self._set(overhead * scale, per_token * scale, shape=False)

    def _set(self, overhead: float, per_token: float, *, shape: bool) -> None:
        self.overhead, self.per_token = float(overhead), float(per_token)
        if shape:
            self._shape = (self.overhead, self.per_token)
