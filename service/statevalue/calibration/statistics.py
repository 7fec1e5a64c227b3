"""Statistics of a calibration run: means with standard errors clustered by prompt."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def clustered_mean(values: np.ndarray, clusters: Sequence[str]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error clustered by ``clusters`` (ratio estimator).

    Values of one cluster (the states of one prompt, which share its responses) count as
    one draw: SE = sqrt(G / (G − 1) · Σ_g (s_g − n_g·mean)²) / n over G clusters with sums
    s_g and sizes n_g. NaN with fewer than two clusters.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    keys = sorted(set(clusters))
    if len(keys) < 2:
        return mean, float("nan")
    index = {k: i for i, k in enumerate(keys)}
    ids = np.array([index[c] for c in clusters])
    sums = np.bincount(ids, weights=values, minlength=len(keys))
    counts = np.bincount(ids, minlength=len(keys))
    resid = sums - counts * mean
    se = np.sqrt((resid**2).sum() * len(keys) / (len(keys) - 1)) / len(values)
    return mean, float(se)


def paired_difference(
    errors: np.ndarray, base: np.ndarray, clusters: Sequence[str]
) -> tuple[float, float]:
    """Mean of ``errors − base`` (the same states under two estimators) and its clustered
    standard error: much smaller than either MAE's, as both share each state's noise."""
    return clustered_mean(np.asarray(errors) - np.asarray(base), clusters)


def beats(difference: tuple[float, float]) -> bool:
    """A paired difference of errors below zero by more than two standard errors."""
    mean, se = difference
    return bool(mean < -2 * se)
