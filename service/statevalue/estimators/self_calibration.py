"""Self-calibration: settings chosen from a request's own rewards (docs/design.md,
"Self-calibration").

Rollout i's reward R_i is a draw of the return from every state of rollout i. For an
estimate U(i, t) that does not use R_i (rollout i left out of the pool),
E[(U(i, t) − R_i)²] = E[(U(i, t) − V(s))²] + E[Var(R | s)], and the second term does not
depend on the settings: the leave-one-rollout-out squared error against the rollouts' own
rewards ranks settings by their mean squared error, with no generation.

Per group, every candidate setting of Hista (node spacing × k × clamp) and Numca (number
pattern × merge distance) is evaluated left-one-out from one representation and one
prefix-distance table; the group mean is left out likewise. The best candidate of each
method may be blended with the group mean or with the other method (weights fitted by least
squares on the same criterion), and the chosen blend U is shrunk towards the rollout's own
reward: V = a·R_i + (1 − a)·U, with a fitted as described at :func:`fit_own_weight`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from statevalue.config import HistaConfig, Method, NumcaConfig, SelfCalibrationConfig
from statevalue.estimators._group import check_group, start_boundaries
from statevalue.estimators.base import ValueEstimate
from statevalue.estimators.hista import (
    _MIN_D_MIN,
    _cross_prefix_distances,
    group_node_spacing,
    hista_nodes,
    hista_representation,
    neighbour_counts,
    node_prefix_lengths,
)
from statevalue.estimators.numca import group_merge_distance, numca_path

# The candidate grids. The product defaults come first in each, so that they win ties
# (e.g. two spacing fractions that round to the same spacing on short answers).
HISTA_RELATIVE_NODE_SPACINGS = (0.08, 0.05, 0.125, 0.2)
HISTA_NEIGHBOURS = ((66, 6), (16, 1), (256, 23))  # (k_max, k_min)
HISTA_RELATIVE_D_MINS = (0.025, 0.01, 0.1)
NUMCA_PATTERNS = ("digits", "decimal")
# Relative merge distances; 0 is the fixed distance 0 (no merging).
NUMCA_RELATIVE_MERGE_DISTANCES = (0.05, 0.025, 0.1, 0.0)
# Criteria are compared at this many significant digits, so that float rounding (which
# depends on the order of the rollouts) never decides between two equal candidates.
_CRITERION_DIGITS = 12
# The anchored own weight is fitted per this many equal parts of each response (chosen
# on the SVEB dev split: 2, 4, 8 and 16 parts were within 0.004 of each other in MAE).
OWN_WEIGHT_BINS = 4


@dataclass(frozen=True)
class TargetGroup:
    """The target side of one group: rewards, and which rollouts can be left out.

    ``eligible[i]``: rollout i has a reward, at least one token and another rewarded
    rollout to be estimated from; only eligible rollouts count in the criterion.
    ``loo_mean[i]`` is the mean reward of the other rewarded rollouts (the group mean for
    a query, or for a rollout that is the only rewarded one).
    """

    lengths: np.ndarray
    rewards: np.ndarray
    rewarded: np.ndarray
    eligible: np.ndarray
    loo_mean: np.ndarray


def target_group(lengths: Sequence[int], rewards: np.ndarray, rewarded: np.ndarray) -> TargetGroup:
    """Check a group and derive its leave-one-out means."""
    rewards, rewarded, mean = check_group(lengths, rewards, rewarded)
    count = int(rewarded.sum())
    total = math.fsum(rewards[rewarded].tolist())
    loo_mean = np.full(len(lengths), mean)
    if count > 1:
        loo_mean[rewarded] = (total - rewards[rewarded]) / (count - 1)
    eligible = rewarded & (np.asarray(lengths) > 0) & (count > 1)
    return TargetGroup(np.asarray(lengths, dtype=np.int64), rewards, rewarded, eligible, loo_mean)


@dataclass(frozen=True)
class Candidate:
    """One candidate's token values in a group, each rewarded rollout estimated without
    its own reward, and the boundaries of the segments they are constant on."""

    values: list[np.ndarray]
    boundaries: list[np.ndarray]


def criterion_terms(values: Sequence[np.ndarray], target: TargetGroup) -> list[float]:
    """Per eligible rollout: the mean over its tokens of (value − R_i)²."""
    return [
        float(np.mean((np.asarray(values[i], dtype=np.float64) - target.rewards[i]) ** 2))
        for i in np.flatnonzero(target.eligible)
    ]


def group_mean_candidate(target: TargetGroup) -> Candidate:
    """Every token of a rollout at the mean reward of the other rewarded rollouts."""
    return Candidate(
        values=[
            np.full(n, m) for n, m in zip(target.lengths.tolist(), target.loo_mean, strict=True)
        ],
        boundaries=[start_boundaries(n) for n in target.lengths.tolist()],
    )


# -- Hista -------------------------------------------------------------------------------


def hista_key(spacing: float, k: tuple[int, int], d_min: float) -> dict[str, Any]:
    """The Hista fields a grid point sets."""
    return {
        "relative_node_spacing": spacing,
        "k_max": k[0],
        "k_min": k[1],
        "relative_d_min": d_min,
    }


def hista_candidates(
    hidden: Sequence[torch.Tensor],
    prompt_len: int,
    target: TargetGroup,
    base: HistaConfig,
) -> list[tuple[dict[str, Any], Candidate]]:
    """Every Hista grid point's leave-one-out values of one group, in grid order.

    One representation and one table of prefix distances (every prefix length any grid
    spacing needs, every pair of rollouts) serve the whole grid. Rollout i's nodes take
    neighbours from the other rewarded rollouts only; tokens before the first interior
    node, and nodes with no candidate, get ``target.loo_mean[i]``. Neighbours are chosen
    with ties (``neighbours = "with_ties"``) whatever ``base`` says, so that the choice
    does not depend on the rollouts' order; the end node's own-reward segment is left out.
    Other fields (EMA, stride, anchor, k schedule, tau, cap on the spacing) are ``base``'s.
    """
    lengths = target.lengths.tolist()
    device = hidden[0].device
    reps, counts = hista_representation(hidden, base)
    spacings: list[tuple[float, list[np.ndarray], list[np.ndarray]]] = []
    for fraction in HISTA_RELATIVE_NODE_SPACINGS:
        config = group_node_spacing(
            lengths,
            target.rewarded,
            base.model_copy(update={"relative_node_spacing": fraction}),
        )
        nodes = [hista_nodes(prompt_len, n, config) for n in lengths]
        spacings.append((fraction, [n.interior for n in nodes], [n.candidates for n in nodes]))
    # Every prefix length (in representation vectors) some spacing asks of each rollout,
    # and the complete one (for the clamp's scale).
    needed = []
    for i, count in enumerate(counts.tolist()):
        positions = np.concatenate([np.concatenate([s[1][i], s[2][i]]) for s in spacings])
        held = node_prefix_lengths(prompt_len, positions, count, base)
        needed.append(np.unique(np.append(held, count)))
    width = max(len(n) for n in needed)
    table_len = torch.as_tensor(
        np.stack([np.pad(n, (0, width - len(n)), constant_values=1) for n in needed]),
        device=device,
    )
    everyone = torch.arange(len(lengths), device=device)
    table = _cross_prefix_distances(reps, everyone, everyone, table_len, table_len).cpu().numpy()
    cands = np.flatnonzero(target.rewarded)
    scale = _distance_scale(table, needed, counts, cands)

    out: list[tuple[dict[str, Any], Candidate]] = []
    for fraction, interior, candidates in spacings:
        node_values = _hista_grid_values(
            table, needed, counts, prompt_len, interior, candidates, cands, target, base, scale
        )
        boundaries = [np.concatenate([[0], b]).astype(np.int64) for b in interior]
        for (k, d_min), per_rollout in node_values.items():
            values = [
                _expand(bounds, row, n)
                for bounds, row, n in zip(boundaries, per_rollout, lengths, strict=True)
            ]
            out.append(
                (
                    hista_key(fraction, k, d_min),
                    Candidate(
                        values,
                        [b if n else b[:0] for b, n in zip(boundaries, lengths, strict=True)],
                    ),
                )
            )
    return out


def _distance_scale(
    table: np.ndarray, needed: list[np.ndarray], counts: np.ndarray, cands: np.ndarray
) -> float:
    """:func:`~statevalue.estimators.hista.group_distance_scale` read from the table: the
    median distance between the complete representations of different rewarded rollouts."""
    if len(cands) < 2:
        return 0.0
    full = np.array([np.searchsorted(needed[j], counts[j]) for j in cands])
    dist = table[cands[:, None], full[:, None], cands[None, :], full[None, :]]
    return float(np.quantile(dist[~np.eye(len(cands), dtype=bool)], 0.5))


def _expand(boundaries: np.ndarray, segment_values: np.ndarray, length: int) -> np.ndarray:
    """Segment values to token values (float64); empty for an empty response."""
    if length == 0:
        return np.zeros(0)
    ends = np.append(boundaries[1:], length)
    return np.repeat(segment_values, ends - boundaries)


def _hista_grid_values(
    table: np.ndarray,
    needed: list[np.ndarray],
    counts: np.ndarray,
    prompt_len: int,
    interior: list[np.ndarray],
    candidates: list[np.ndarray],
    cands: np.ndarray,
    target: TargetGroup,
    base: HistaConfig,
    scale: float,
) -> dict[tuple[tuple[int, int], float], list[np.ndarray]]:
    """Per (k, clamp) grid point: per rollout, [left-out mean, value of each interior node]."""
    n_rollouts = len(interior)

    def index(i: int, positions: np.ndarray) -> np.ndarray:
        held = node_prefix_lengths(prompt_len, positions, int(counts[i]), base)
        return np.searchsorted(needed[i], held)

    width_a = max(1, max(len(b) for b in interior))
    width_b = max(len(candidates[j]) for j in cands)
    query_at = np.zeros((n_rollouts, width_a), dtype=np.int64)
    query_real = np.zeros((n_rollouts, width_a), dtype=bool)
    for i, b in enumerate(interior):
        query_at[i, : len(b)] = index(i, b)
        query_real[i, : len(b)] = True
    cand_at = np.zeros((len(cands), width_b), dtype=np.int64)
    cand_real = np.zeros((len(cands), width_b), dtype=bool)
    for c, j in enumerate(cands):
        cand_at[c, : len(candidates[j])] = index(j, candidates[j])
        cand_real[c, : len(candidates[j])] = True
    # (rollout, node, candidate rollout, candidate node)
    dist = table[
        np.arange(n_rollouts)[:, None, None, None],
        query_at[:, :, None, None],
        cands[None, None, :, None],
        cand_at[None, None, :, :],
    ]
    excluded = ~cand_real[None, None] | (
        cands[None, None, :, None] == np.arange(n_rollouts)[:, None, None, None]
    )
    dist = np.where(excluded, np.inf, dist).reshape(n_rollouts, width_a, -1)
    reward = np.repeat(target.rewards[cands], width_b)
    ordered = np.sort(dist, axis=-1)
    available = np.isfinite(ordered).sum(-1)
    out: dict[tuple[tuple[int, int], float], list[np.ndarray]] = {}
    for k_pair in HISTA_NEIGHBOURS:
        k = np.zeros((n_rollouts, width_a), dtype=np.int64)
        for i, b in enumerate(interior):
            k[i, : len(b)] = neighbour_counts(len(b), k_pair[0], k_pair[1], base.k_schedule)
        k = np.clip(np.minimum(k, available), 1, None)
        kth_raw = np.take_along_axis(ordered, (k - 1)[:, :, None], axis=-1)
        for fraction in HISTA_RELATIVE_D_MINS:
            clamp = max(fraction * scale, _MIN_D_MIN)
            kth = np.maximum(kth_raw, clamp)
            chosen = np.isfinite(dist) & (dist <= kth) & query_real[:, :, None]
            with np.errstate(divide="ignore"):
                weight = np.where(chosen, np.maximum(dist, clamp) ** -base.tau, 0.0)
            total = weight.sum(-1)
            safe = np.where(total > 0, total, 1.0)
            node = np.where(total > 0, (weight * reward).sum(-1) / safe, target.loo_mean[:, None])
            out[(k_pair, fraction)] = [
                np.concatenate([[target.loo_mean[i]], node[i, : len(interior[i])]])
                for i in range(n_rollouts)
            ]
    return out


# -- Numca -------------------------------------------------------------------------------


def numca_key(pattern: str, merge: float) -> dict[str, Any]:
    """The Numca fields a grid point sets."""
    if merge == 0:
        return {"number_pattern": pattern, "merge_distance": 0, "relative_merge_distance": 0.0}
    return {"number_pattern": pattern, "relative_merge_distance": merge}


def numca_candidates(
    texts: Sequence[str],
    token_ends: Sequence[np.ndarray],
    target: TargetGroup,
    base: NumcaConfig,
) -> list[tuple[dict[str, Any], Candidate]]:
    """Every Numca grid point's leave-one-out values of one group, in grid order.

    The table holds the group's rewarded rollouts; rollout i reads it with its own
    contribution taken out. A state no other rollout reached reads the value of the state
    before it (the empty state reads ``target.loo_mean[i]``). The final state after the
    last token is not valued. Other fields (drop_last_number, number_boundary,
    table_states) are ``base``'s; ``prior_count`` is not applied.
    """
    lengths = target.lengths.tolist()
    out = []
    for pattern in NUMCA_PATTERNS:
        for merge in NUMCA_RELATIVE_MERGE_DISTANCES:
            key = numca_key(pattern, merge)
            config = NumcaConfig.model_validate({**base.model_dump(), **key})
            config = group_merge_distance(lengths, target.rewarded, config)
            paths = [numca_path(t, e, config) for t, e in zip(texts, token_ends, strict=True)]
            counted = [
                frozenset(p.table_states(config.table_states)) if r else frozenset()
                for p, r in zip(paths, target.rewarded, strict=True)
            ]
            stats: dict[frozenset[str], list[float]] = {}
            for states, reward in zip(counted, target.rewards, strict=True):
                for state in states:
                    entry = stats.setdefault(state, [0, 0.0])
                    entry[0] += 1
                    entry[1] += float(reward)
            values = []
            for i, path in enumerate(paths):
                known = float(target.loo_mean[i])
                segment_values = []
                for state in path.states:
                    count, total = stats.get(state, (0, 0.0))
                    if state in counted[i] and target.eligible[i]:
                        count, total = count - 1, total - float(target.rewards[i])
                    if count > 0:
                        known = total / count
                    segment_values.append(known)
                values.append(_expand(path.boundaries, np.array(segment_values), lengths[i]))
            out.append((key, Candidate(values, [p.boundaries for p in paths])))
    return out


# -- choice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelfCalibration:
    """What self-calibration chose for one method, and why.

    ``params``: the settings of each estimator in the blend, per section (only the fields
    the grid varies). ``weights``: the blend's weight per method (they sum to 1).
    ``own_weights``: a in V = a·R_i + (1 − a)·blend, per equal part of the response (one
    part with ``own_weight = "fitted"``, :data:`OWN_WEIGHT_BINS` with "anchored");
    ``own_weight``: their mean. ``criterion``: the blend's
    leave-one-rollout-out mean squared error against the rollouts' rewards, over the
    scope; ``group_mean_criterion``: the same for the left-out group mean (the bar).
    ``candidates``: how many were compared; ``scope``: "group" or "request".
    """

    params: dict[str, dict[str, Any]]
    weights: dict[str, float]
    own_weight: float
    own_weights: tuple[float, ...]
    criterion: float
    group_mean_criterion: float
    candidates: int
    scope: str


@dataclass(frozen=True)
class GroupCandidates:
    """One group's targets and the candidates of each method (empty when not computed)."""

    target: TargetGroup
    hista: list[tuple[dict[str, Any], Candidate]]
    numca: list[tuple[dict[str, Any], Candidate]]


@dataclass(frozen=True)
class _Blend:
    parts: tuple[tuple[str, int], ...]  # (method, candidate index)
    weights: tuple[float, ...]
    criterion: float


def _pooled(terms: Sequence[Sequence[float]]) -> float:
    """Mean of the per-rollout terms of every group, independent of their order."""
    flat = sorted(t for group in terms for t in group)
    return math.fsum(flat) / len(flat) if flat else math.nan


def _rounded(value: float) -> float:
    return float(f"{value:.{_CRITERION_DIGITS}g}") if math.isfinite(value) else math.inf


def _fit_pair(
    groups: Sequence[GroupCandidates],
    a: Sequence[Candidate],
    b: Sequence[Candidate],
) -> tuple[float, float]:
    """w in [0, 1] minimising the criterion of w·a + (1 − w)·b, and that criterion."""
    num, den = [], []
    for g, ca, cb in zip(groups, a, b, strict=True):
        for i in np.flatnonzero(g.target.eligible):
            d = ca.values[i] - cb.values[i]
            e = g.target.rewards[i] - cb.values[i]
            num.append(float(np.mean(d * e)))
            den.append(float(np.mean(d * d)))
    total = math.fsum(sorted(den))
    w = min(max(math.fsum(sorted(num)) / total, 0.0), 1.0) if total > 0 else 1.0
    w = _rounded(w)
    blended = [
        criterion_terms(
            [w * x + (1 - w) * y for x, y in zip(ca.values, cb.values, strict=True)], g.target
        )
        for g, ca, cb in zip(groups, a, b, strict=True)
    ]
    return w, _pooled(blended)


def fit_own_weight(groups: Sequence[GroupCandidates], blend: Sequence[Candidate]) -> float:
    """The weight a of the rollout's own reward in V = a·R_i + (1 − a)·U.

    With U independent of R_i given the state, the error of the mix is a²·σ² + (1 − a)²·m
    (σ² = E[Var(R | s)], m = E[(U − V)²]), least at a = m / (m + σ²) = 1 − σ² / C, where C
    = m + σ² is U's leave-one-out criterion. σ² = S − Var(V(s)) (total variance), with S
    the groups' reward variance (unbiased) and Var(V(s)) estimated by the covariance of R_i
    and U around the left-out mean (exact when U's error is uncorrelated with V; a U
    shrunk towards the mean under-states it, which makes a smaller). Clipped to [0, 1].
    """
    variances, covariances, errors = [], [], []
    for t, values, i, variance in _rewarded_rollouts(groups, blend):
        u = values - t.loo_mean[i]
        variances.append(variance)
        covariances.append(float(np.mean((t.rewards[i] - t.loo_mean[i]) * u)))
        errors.append(float(np.mean((values - t.rewards[i]) ** 2)))
    sigma2 = math.fsum(sorted(variances)) - max(math.fsum(sorted(covariances)), 0.0)
    return _shrinkage(sigma2, errors)


def position_bins(length: int, bins: int) -> np.ndarray:
    """Each token's bin: token t of n lies in bin ⌊bins·t / n⌋ (equal fractions)."""
    return (np.arange(length) * bins) // max(length, 1)


def fit_anchored_own_weights(
    groups: Sequence[GroupCandidates], blend: Sequence[Candidate], bins: int = OWN_WEIGHT_BINS
) -> tuple[float, ...]:
    """The weight of the rollout's own reward per bin of :func:`position_bins`, with σ²
    anchored at the two states where it is known.

    a = 1 − σ² / C as in :func:`fit_own_weight`, with C the bin's leave-one-out criterion
    and σ²(t) = E[Var(R | s_t)] taken as S·(1 − (t + ½) / n): at the prompt every rollout
    shares the state, so Var(R | s_0) is the group's reward variance S; after the last
    token a reward that is a function of the response has no variance left; in between it
    falls linearly in the fraction of the response written. The covariance estimate of
    :func:`fit_own_weight` needs U's error to be uncorrelated with V, which a leave-one-out
    U shrunk towards the group mean is not (on the SVEB dev split it gave a ≈ 0.1, far
    below the mix's ½, and lost to the defaults; docs/design.md, "Self-calibration").
    """
    variances: list[list[float]] = [[] for _ in range(bins)]
    errors: list[list[float]] = [[] for _ in range(bins)]
    for t, values, i, variance in _rewarded_rollouts(groups, blend):
        n = len(values)
        where = position_bins(n, bins)
        remaining = 1.0 - (np.arange(n) + 0.5) / n
        for b in np.unique(where).tolist():
            at = where == b
            variances[b].append(variance * float(np.mean(remaining[at])))
            errors[b].append(float(np.mean((values[at] - t.rewards[i]) ** 2)))
    return tuple(
        _shrinkage(math.fsum(sorted(v)), e) for v, e in zip(variances, errors, strict=True)
    )


def _rewarded_rollouts(
    groups: Sequence[GroupCandidates], blend: Sequence[Candidate]
) -> Iterator[tuple[TargetGroup, np.ndarray, int, float]]:
    """(target, the blend's values, rollout index, the group's unbiased reward variance)
    for each eligible rollout of the groups with at least two rewards."""
    for g, candidate in zip(groups, blend, strict=True):
        t = g.target
        rewards = t.rewards[t.rewarded]
        if len(rewards) < 2:
            continue
        variance = float(np.var(rewards, ddof=1))
        for i in np.flatnonzero(t.eligible):
            yield t, candidate.values[i], int(i), variance


def _shrinkage(sigma2: float, errors: Sequence[float]) -> float:
    """1 − σ² / C (σ² and C summed over the same rollouts), clipped to [0, 1]."""
    criterion = math.fsum(sorted(errors))
    if not errors or criterion <= 0:
        return 0.0
    return _rounded(min(max(1.0 - max(sigma2, 0.0) / criterion, 0.0), 1.0))


def _best(groups: Sequence[GroupCandidates], method: str) -> tuple[int, float, int]:
    """Index and criterion of the method's best candidate (earliest on ties), and how many."""
    count = len(getattr(groups[0], method))
    scores = [
        _rounded(
            _pooled([criterion_terms(getattr(g, method)[c][1].values, g.target) for g in groups])
        )
        for c in range(count)
    ]
    best = min(range(count), key=lambda c: (scores[c], c))
    return best, scores[best], count


def self_calibrate(
    groups: Sequence[GroupCandidates],
    methods: Sequence[Method],
    config: SelfCalibrationConfig,
) -> list[dict[str, tuple[ValueEstimate, SelfCalibration]]]:
    """Choose, for each of ``methods`` ("hista", "numca"), one blend for all of ``groups``
    and give every group its values under it.

    A method's candidates are its grid and, with ``config.combine``, its best grid point
    blended with the left-out group mean or with the other method's best grid point
    (when that method's candidates were computed). Rewarded rollouts get
    a·R_i + (1 − a)·(their left-out blend), queries the blend of every rewarded rollout.
    """
    means = [group_mean_candidate(g.target) for g in groups]
    gm_criterion = _rounded(
        _pooled([criterion_terms(m.values, g.target) for g, m in zip(groups, means, strict=True)])
    )
    available = [m for m in ("hista", "numca") if all(getattr(g, m) for g in groups)]
    best = {m: _best(groups, m) for m in available}

    def chosen(method: str) -> list[Candidate]:
        return [getattr(g, method)[best[method][0]][1] for g in groups]

    out: list[dict[str, tuple[ValueEstimate, SelfCalibration]]] = [{} for _ in groups]
    for method in methods:
        if method not in best:
            continue
        index, score, count = best[method]
        blend = _Blend(((method, index),), (1.0,), score)
        if config.combine:
            partners: list[tuple[str, list[Candidate], int]] = [("group_mean", means, 0)]
            partners += [(m, chosen(m), best[m][0]) for m in available if m != method]
            for name, partner, partner_index in partners:
                w, criterion = _fit_pair(groups, chosen(method), partner)
                count += 1
                if _rounded(criterion) < blend.criterion:
                    blend = _Blend(
                        ((method, index), (name, partner_index)),
                        (w, _rounded(1 - w)),
                        _rounded(criterion),
                    )
        per_group = [_blend_candidate(g, means[k], blend) for k, g in enumerate(groups)]
        own: tuple[float, ...] = (0.0,)
        if config.own_weight == "fitted":
            own = (fit_own_weight(groups, per_group),)
        elif config.own_weight == "anchored":
            own = fit_anchored_own_weights(groups, per_group)
        params = {
            name: getattr(groups[0], name)[at][0]
            for name, at in blend.parts
            if name != "group_mean"
        }
        weights = {name: w for (name, _), w in zip(blend.parts, blend.weights, strict=True)}
        report = SelfCalibration(
            params=params,
            weights=weights,
            own_weight=_rounded(math.fsum(own) / len(own)),
            own_weights=own,
            criterion=blend.criterion,
            group_mean_criterion=gm_criterion,
            candidates=count,
            scope=config.scope,
        )
        for k, (g, candidate) in enumerate(zip(groups, per_group, strict=True)):
            out[k][method] = (_with_own_reward(candidate, g.target, own), report)
    return out


def _blend_candidate(group: GroupCandidates, mean: Candidate, blend: _Blend) -> Candidate:
    """The blend's left-out values in one group; boundaries are the parts' union."""
    parts = [
        mean if name == "group_mean" else getattr(group, name)[at][1] for name, at in blend.parts
    ]
    values = [
        sum(w * p.values[i] for w, p in zip(blend.weights, parts, strict=True))
        for i in range(len(group.target.lengths))
    ]
    boundaries = [
        np.unique(np.concatenate([p.boundaries[i] for p in parts])).astype(np.int64)
        for i in range(len(group.target.lengths))
    ]
    return Candidate(values, boundaries)


def _with_own_reward(
    candidate: Candidate, target: TargetGroup, own: Sequence[float]
) -> ValueEstimate:
    """a·R_i + (1 − a)·U for the eligible rollouts (a per position bin), U for the others;
    float32 values. A weight per bin adds the bins' edges to the segment boundaries."""
    values, boundaries = [], []
    for i, (u, bounds) in enumerate(zip(candidate.values, candidate.boundaries, strict=True)):
        if target.eligible[i]:
            where = position_bins(len(u), len(own))
            a = np.asarray(own)[where]
            u = a * target.rewards[i] + (1 - a) * u
            if len(own) > 1:
                edges = np.flatnonzero(np.diff(where)) + 1
                bounds = np.union1d(bounds, edges).astype(np.int64)
        values.append(np.asarray(u, dtype=np.float32))
        boundaries.append(bounds)
    return ValueEstimate(values=values, boundaries=boundaries)
