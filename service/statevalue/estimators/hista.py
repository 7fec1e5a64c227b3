"""Hista: nearest neighbours in hidden-state space between the rollouts of a group (DESIGN §3.3).

Each rollout is represented by its smoothed, downsampled hidden states r_1..r_m. A node is
a prefix of that sequence at a response boundary and carries its rollout's reward; the
value of an interior node is the inverse-distance weighted reward of its k nearest nodes.

Choices beyond the design:

- A prefix holds the first ``floor(position / stride)`` vectors, but at least one: a
  sequence shorter than the stride is represented by its last smoothed vector alone.
- Between prefixes of equal length the Chamfer distance is taken over the query's vectors.
- Candidates tied with the k-th nearest distance are all neighbours, so the result does
  not depend on the order of the rollouts (the reference's top-k would pick by position).
- The k schedule rounds half up.

Two rules beyond the reference: ``relative_d_min`` (the clamp as a fraction of the group's
own distance scale; the configuration's default) and ``own_weight`` (down-weighting the
query rollout's own prefix nodes, which all repeat its own reward; off by default).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from statevalue.config import HistaConfig
from statevalue.estimators._group import check_group, piecewise
from statevalue.estimators.base import ValueEstimate

# Kernel terms below this relative weight are dropped from the EMA.
_EMA_CUTOFF = 1e-9
# Rough memory cap for the pairwise distance matrices computed at once.
_CHUNK_BYTES = 256 * 2**20
# Floor of the distance clamp when a relative d_min meets a group of identical rollouts.
_MIN_D_MIN = 1e-6
# Boundary of a padding slot in the candidate table.
_NO_NODE = np.iinfo(np.int64).max


def ema_smooth(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """Bias-corrected EMA along the sequence axis of (L, H) or (B, L, H), in float32.

    e_0 = 0, e_t = alpha·e_{t-1} + (1 − alpha)·x_t, output e_t / (1 − alpha^t). The
    exponential kernel is truncated where alpha^n < 1e-9 and applied as two block-Toeplitz
    matrix products (current and previous block), so there is no loop over the sequence.
    """
    batched = x.dim() == 3
    x = (x if batched else x[None]).float()
    length = x.shape[1]
    if length == 0:
        return x if batched else x[0]
    taps = 1 if alpha == 0 else math.ceil(math.log(_EMA_CUTOFF) / math.log(alpha))
    block = max(1, min(taps, length))
    n_blocks = -(-length // block)
    blocks = F.pad(x, (0, 0, 0, n_blocks * block - length)).unflatten(1, (n_blocks, block))
    previous = F.pad(blocks, (0, 0, 0, 0, 1, 0))[:, :-1]
    lag = torch.arange(block, device=x.device)
    lag = (lag[:, None] - lag[None, :]).double()
    decay = torch.tensor(alpha, dtype=torch.float64, device=x.device)
    # Lag 0 .. block-1 inside the block; block .. 2·block-1 from the previous block.
    within = torch.where(lag >= 0, (1 - alpha) * decay.pow(lag.clamp_min(0)), 0.0).float()
    across = ((1 - alpha) * decay.pow(lag + block)).float()
    smoothed = (within @ blocks + across @ previous).flatten(1, 2)[:, :length]
    steps = torch.arange(1, length + 1, dtype=torch.float64, device=x.device)
    smoothed = smoothed / (1 - decay.pow(steps)).float()[:, None]
    return smoothed if batched else smoothed[0]


def prefix_chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """One-sided Chamfer distance between two prefixes (n, H), computed the obvious way.

    The mean, over the vectors of the longer prefix (``a`` when equally long), of the L2
    distance to the nearest vector of the other.
    """
    if len(a) == 0 or len(b) == 0:
        raise ValueError("prefixes must hold at least one vector")
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    longer, shorter = longer.double(), shorter.double()
    distances = (longer[:, None, :] - shorter[None, :, :]).pow(2).sum(-1).sqrt()
    return float(distances.min(dim=1).values.mean())


def prefix_distances(
    x: torch.Tensor, y: torch.Tensor, x_lengths: torch.Tensor, y_lengths: torch.Tensor
) -> torch.Tensor:
    """Prefix Chamfer distances for a batch of sequence pairs, from one pairwise matrix each.

    x (c, M, H), y (c, N, H); x_lengths (c, A) and y_lengths (c, B) are prefix lengths in
    [1, M] and [1, N]. Returns float64 (c, A, B): ``prefix_chamfer(x[p, :x_lengths[p, a]],
    y[p, :y_lengths[p, b]])``. A running minimum along one axis gives each vector's nearest
    neighbour inside every prefix of the other sequence; a running sum along the other axis
    then gives the sum for every prefix pair.
    """
    d = torch.cdist(x.float(), y.float())
    rows, cols = d.shape[1], d.shape[2]
    x_at = (x_lengths - 1)[:, :, None]
    y_at = (y_lengths - 1)[:, None, :]
    # x prefix is the longer one: sum over x vectors of the nearest y vector in the prefix.
    nearest_y = d.cummin(dim=2).values.gather(2, y_at.expand(-1, rows, -1))
    from_x = nearest_y.double().cumsum(1).gather(1, x_at.expand(-1, -1, y_at.shape[2]))
    nearest_x = d.cummin(dim=1).values.gather(1, x_at.expand(-1, -1, cols))
    from_y = nearest_x.double().cumsum(2).gather(2, y_at.expand(-1, x_at.shape[1], -1))
    x_len = x_lengths[:, :, None].double()
    y_len = y_lengths[:, None, :].double()
    return torch.where(x_len >= y_len, from_x / x_len, from_y / y_len)


def neighbour_counts(n: int, k_max: int, k_min: int) -> np.ndarray:
    """k for each of n interior nodes, falling linearly from k_max (first) to k_min (last)."""
    if n == 1:
        return np.array([k_max], dtype=np.int64)
    ramp = k_max - (k_max - k_min) * np.arange(n) / (n - 1)
    return np.floor(ramp + 0.5).astype(np.int64)


def _padded(rows: list[np.ndarray], fill: int, device: torch.device) -> torch.Tensor:
    """Stack int rows of different lengths into one (len(rows), max length) tensor."""
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out).to(device)


def _representations(
    hidden: Sequence[torch.Tensor], alpha: float, stride: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Smoothed, downsampled states of every rollout, zero-padded to (G, M, H), and each m_i."""
    seq_lengths = np.array([len(h) for h in hidden])
    smoothed = ema_smooth(pad_sequence([h.float() for h in hidden], batch_first=True), alpha)
    counts = seq_lengths // stride
    longest = int(counts.max())
    reps = smoothed.new_zeros(len(hidden), max(1, longest), smoothed.shape[2])
    reps[:, :longest] = smoothed[:, stride - 1 : longest * stride : stride]
    short = np.flatnonzero(counts == 0)
    if short.size:
        # Shorter than one stride: the last smoothed vector stands for the whole sequence.
        rows = torch.from_numpy(short).to(smoothed.device)
        ends = torch.from_numpy(seq_lengths[short] - 1).to(smoothed.device)
        reps[rows, 0] = smoothed[rows, ends]
        counts[short] = 1
    return reps, counts


def _cross_prefix_distances(
    reps: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    row_len: torch.Tensor,
    col_len: torch.Tensor,
) -> torch.Tensor:
    """Prefix distances for every (row rollout, column rollout) pair: (R, A, C, B) float64.

    ``row_len`` (R, A) and ``col_len`` (C, B) are the prefix lengths of each rollout's
    nodes. One pair per batch row of ``prefix_distances``, chunked to bound memory.
    """
    n_r, n_c = len(rows), len(cols)
    pair_r = torch.arange(n_r, device=reps.device).repeat_interleave(n_c)
    pair_c = torch.arange(n_c, device=reps.device).repeat(n_r)
    per_pair = 32 * reps.shape[1] ** 2  # distances, running minima and their indices
    chunk = max(1, _CHUNK_BYTES // per_pair)
    dist = torch.empty(
        n_r, row_len.shape[1], n_c, col_len.shape[1], dtype=torch.float64, device=reps.device
    )
    for lo in range(0, n_r * n_c, chunk):
        r, c = pair_r[lo : lo + chunk], pair_c[lo : lo + chunk]
        dist[r, :, c] = prefix_distances(reps[rows[r]], reps[cols[c]], row_len[r], col_len[c])
    return dist


def group_distance_scale(reps: torch.Tensor, counts: np.ndarray, rollouts: np.ndarray) -> float:
    """Median Chamfer distance between the complete representations of ``rollouts``.

    ``reps`` and ``counts`` as Hista builds them (smoothed, downsampled, zero-padded); the
    median is over ordered pairs of different rollouts (the distance between equally long
    sequences depends on the direction), so it does not depend on the rollouts' order. At
    least two rollouts are needed.
    """
    if len(rollouts) < 2:
        raise ValueError("a distance scale needs at least two rollouts")
    index = torch.as_tensor(rollouts, device=reps.device)
    full = torch.as_tensor(counts[rollouts], device=reps.device)[:, None]
    dist = _cross_prefix_distances(reps, index, index, full, full)[:, 0, :, 0]
    others = ~torch.eye(len(rollouts), dtype=torch.bool, device=reps.device)
    # The mean of the two middle values: torch's median takes the lower one, which would
    # make the result depend on which of two tied directions sorts first.
    return float(dist[others].quantile(0.5))


def hista_values(
    hidden: Sequence[torch.Tensor],
    prompt_len: int,
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    config: HistaConfig,
) -> ValueEstimate:
    """Hista values of one group; ``hidden[i]`` is (prompt_len + lengths[i], H).

    Tokens before the first interior node get the group mean; the segment from interior
    node k gets that node's neighbour estimate. Computed on the device of ``hidden``.
    """
    rewards, rewarded, mean = check_group(lengths, rewards, rewarded)
    if len(hidden) != len(lengths):
        raise ValueError(f"{len(hidden)} hidden-state tensors for {len(lengths)} rollouts")
    for i, (states, length) in enumerate(zip(hidden, lengths, strict=True)):
        if states.dim() != 2 or states.shape[0] != prompt_len + length or states.shape[0] == 0:
            raise ValueError(
                f"hidden[{i}] has shape {tuple(states.shape)}, expected "
                f"({prompt_len + length}, H) with at least one row"
            )
    spacing, stride = config.node_spacing, config.stride
    starts = [np.arange(0, length, spacing) for length in lengths]
    boundaries = [b.astype(np.int64) for b in starts]
    values = [np.full(length, mean, dtype=np.float32) for length in lengths]
    queries = [i for i, b in enumerate(starts) if len(b) > 1]
    if not queries:
        return ValueEstimate(values=values, boundaries=boundaries)

    device = hidden[0].device
    reps, counts = _representations(hidden, config.ema_alpha, stride)

    def prefix_len(i: int, b: np.ndarray) -> np.ndarray:
        return np.clip((prompt_len + b) // stride, 1, counts[i])

    # Query side: the interior nodes of every rollout that has some.
    query_b = [starts[i][1:] for i in queries]
    query_len = _padded(
        [prefix_len(i, b) for i, b in zip(queries, query_b, strict=True)], 1, device
    )
    query_bound = _padded(query_b, 0, device)
    query_k = _padded(
        [neighbour_counts(len(b), config.k_max, config.k_min) for b in query_b], 0, device
    )
    # Candidate side: start, interior and end nodes of every rewarded rollout.
    cands = np.flatnonzero(rewarded)
    cand_b = [np.append(starts[j], lengths[j]) for j in cands]
    cand_len = _padded([prefix_len(j, b) for j, b in zip(cands, cand_b, strict=True)], 1, device)
    cand_bound = _padded(cand_b, _NO_NODE, device)

    query_rollout = torch.as_tensor(queries, device=device)
    cand_rollout = torch.as_tensor(cands, device=device)
    dist = _cross_prefix_distances(reps, query_rollout, cand_rollout, query_len, cand_len)
    d_min = config.d_min
    if config.relative_d_min > 0 and len(cands) > 1:
        d_min = config.relative_d_min * group_distance_scale(reps, counts, cands)
    dist = dist.flatten(2).clamp_min(max(d_min, _MIN_D_MIN))
    cand_owner = cand_rollout.repeat_interleave(cand_len.shape[1])
    cand_bound = cand_bound.flatten()
    own = cand_owner[None, None, :] == query_rollout[:, None, None]
    # Padding nodes, and a rollout's own nodes beyond the query node, are not candidates.
    excluded = (cand_bound[None, None, :] == _NO_NODE) | (
        own & (cand_bound[None, None, :] > query_bound[:, :, None])
    )
    if config.own_weight == 0:
        excluded = excluded | own
    dist = dist.masked_fill(excluded, math.inf)
    cand_reward = torch.as_tensor(rewards[cands], device=device).repeat_interleave(
        cand_len.shape[1]
    )
    # The k-th smallest distance of each query node; every candidate at most that far is a
    # neighbour, so candidates tied with the k-th (common: identical prompt prefixes, the
    # d_min clamp) all count and the result does not depend on the rollouts' order.
    nearest = torch.sort(dist, dim=-1).values
    available = torch.isfinite(nearest).sum(-1)
    k = torch.minimum(query_k, available).clamp_min(1)
    kth = nearest.gather(-1, (k - 1)[:, :, None])
    weight = torch.where(torch.isfinite(dist) & (dist <= kth), dist.pow(-config.tau), 0.0)
    weight = torch.where(own, weight * config.own_weight, weight)
    total = weight.sum(-1)
    # No candidate at all (own nodes excluded and no other rewarded rollout): group mean.
    node_values = torch.where(total > 0, (weight * cand_reward).sum(-1) / total, mean)
    node_values = node_values.cpu().numpy()

    for row, i in enumerate(queries):
        segment_values = np.append(mean, node_values[row, : len(query_b[row])])
        values[i] = piecewise(boundaries[i], segment_values, lengths[i])
    return ValueEstimate(values=values, boundaries=boundaries)
