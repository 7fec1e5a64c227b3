"""Hista: nearest neighbours in hidden-state space between the rollouts of a group.

Each rollout is represented by its smoothed, downsampled hidden states r_1..r_m. A node is
a prefix of that sequence at a boundary and carries its rollout's reward; the value of an
interior node is the inverse-distance weighted reward of its k nearest nodes. The rules
are described, with every option and its measured effect, in docs/design.md ("Hista").

Choices where the reference code leaves nothing to follow:

- Between prefixes of equal length the Chamfer distance is taken over the query's vectors
  (as the reference's distance computation does).
- Rollouts without a reward (queries) are valued but are never candidates.
- With ``downsample = "causal"`` a sequence shorter than the stride is represented by its
  last smoothed vector alone.
- A candidate excluded from a query (an own node past it) never counts, whatever ``tau``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from statevalue.config import HistaConfig, KSchedule
from statevalue.estimators._group import check_group, length_fraction, piecewise
from statevalue.estimators.base import ValueEstimate
from statevalue_client.states import ema_smooth as ema_smooth
from statevalue_client.states import smoothed_representations

# Rough memory cap for the pairwise distance matrices computed at once.
_CHUNK_BYTES = 256 * 2**20
# Floor of the distance clamp when a relative d_min meets a group of identical rollouts.
_MIN_D_MIN = 1e-6
# Boundary of a padding slot in the candidate table.
_NO_NODE = np.iinfo(np.int64).max


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
    # float64: the first hidden states of a sequence can have norms in the thousands, and
    # cdist's matrix-product form loses the small distances between such vectors in float32.
    d = torch.cdist(x.double(), y.double())
    rows, cols = d.shape[1], d.shape[2]
    x_at = (x_lengths - 1)[:, :, None]
    y_at = (y_lengths - 1)[:, None, :]
    # x prefix is the longer one: sum over x vectors of the nearest y vector in the prefix.
    nearest_y = d.cummin(dim=2).values.gather(2, y_at.expand(-1, rows, -1))
    from_x = nearest_y.cumsum(1).gather(1, x_at.expand(-1, -1, y_at.shape[2]))
    nearest_x = d.cummin(dim=1).values.gather(1, x_at.expand(-1, -1, cols))
    from_y = nearest_x.cumsum(2).gather(2, y_at.expand(-1, x_at.shape[1], -1))
    x_len = x_lengths[:, :, None].double()
    y_len = y_lengths[:, None, :].double()
    return torch.where(x_len >= y_len, from_x / x_len, from_y / y_len)


def neighbour_counts(n: int, k_max: int, k_min: int, schedule: KSchedule) -> np.ndarray:
    """k for each of n interior nodes.

    ``"floor_step"`` (the reference): k_i = k_max − ⌊(k_max − k_min) / n⌋·i, which never
    quite reaches k_min and stays at k_max for every node when n > k_max − k_min.
    ``"linear"``: k falls linearly from k_max (first) to k_min (last), rounded half up.
    """
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if schedule == "floor_step":
        return k_max - ((k_max - k_min) // n) * np.arange(n, dtype=np.int64)
    if schedule == "linear":
        if n == 1:
            return np.array([k_max], dtype=np.int64)
        ramp = k_max - (k_max - k_min) * np.arange(n) / (n - 1)
        return np.floor(ramp + 0.5).astype(np.int64)
    raise ValueError(f"unknown k schedule {schedule!r}")


@dataclass(frozen=True)
class HistaNodes:
    """The node positions of one rollout, as response token indices.

    ``interior`` are the nodes that get an estimate; ``candidates`` (start, interior and
    end, sorted, without repeats) are the nodes a rewarded rollout offers to the others.
    """

    interior: np.ndarray
    candidates: np.ndarray


def group_node_spacing(
    lengths: Sequence[int], rewarded: np.ndarray, config: HistaConfig
) -> HistaConfig:
    """``config`` with one group's node spacing fixed.

    A relative spacing becomes ``relative_node_spacing`` × the median length of the
    group's rewarded responses, rounded, between 1 and ``node_spacing``; a fixed spacing is
    returned unchanged.
    """
    if config.relative_node_spacing == 0:
        return config
    spacing = length_fraction(
        lengths, rewarded, config.relative_node_spacing, 1, config.node_spacing
    )
    return config.model_copy(update={"node_spacing": spacing, "relative_node_spacing": 0.0})


def hista_nodes(prompt_len: int, length: int, config: HistaConfig) -> HistaNodes:
    """Where the nodes of a response of ``length`` tokens after ``prompt_len`` sit.

    The end node is on the last response token (``end_node = "last_token"``, reference) or
    after it. Interior nodes lie strictly between the start and the end node, on a grid of
    ``node_spacing`` tokens anchored at the first prompt token (reference) or at the first
    response token. A relative spacing must be fixed first (:func:`group_node_spacing`).
    """
    if config.relative_node_spacing:
        raise ValueError("a relative node spacing needs the group: use group_node_spacing")
    spacing = config.node_spacing
    end = length - 1 if config.end_node == "last_token" else length
    if config.node_anchor == "prompt_start":
        first = (prompt_len // spacing + 1) * spacing - prompt_len
    else:
        first = spacing
    interior = np.arange(first, max(end, 0), spacing, dtype=np.int64)
    candidates = np.unique(np.concatenate([[0], interior, [max(end, 0)]])).astype(np.int64)
    return HistaNodes(interior=interior, candidates=candidates)


def hista_representation(
    hidden: Sequence[torch.Tensor], config: HistaConfig
) -> tuple[torch.Tensor, np.ndarray]:
    """Smoothed, downsampled states of every rollout, zero-padded to (G, M, H), and each m_i.

    ``downsample = "inclusive"`` keeps positions 0, w, 2w, …; ``"causal"`` keeps w − 1,
    2w − 1, … (a sequence shorter than w keeps its last position). The rule lives in
    ``statevalue_client.states``, which trainers run on their own hidden states.
    """
    return smoothed_representations(
        hidden, config.ema_alpha, config.ema_start, config.stride, config.downsample
    )


def node_prefix_lengths(
    prompt_len: int, positions: np.ndarray, count: int, config: HistaConfig
) -> np.ndarray:
    """How many representation vectors the node at each response position holds.

    ``"inclusive"``: the kept vectors up to and including the node's own token;
    ``"causal"``: those strictly before it. At least one, at most ``count``.
    """
    absolute = prompt_len + np.asarray(positions, dtype=np.int64)
    held = absolute // config.stride + (1 if config.downsample == "inclusive" else 0)
    return np.clip(held, 1, count)


def _padded(rows: list[np.ndarray], fill: int, device: torch.device) -> torch.Tensor:
    """Stack int rows of different lengths into one (len(rows), max length) tensor."""
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out).to(device)


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
    per_pair = 48 * reps.shape[1] ** 2  # float64 distances, running minima and their indices
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


def _select_neighbours(
    dist: torch.Tensor, valid: torch.Tensor, query_k: torch.Tensor, config: HistaConfig
) -> torch.Tensor:
    """0/1 mask (Q, A, N) of the neighbours of every query node.

    ``dist`` holds the clamped distances to every real candidate node in candidate order
    (rollout by rollout, node by node), +inf where a candidate is excluded.
    """
    if config.neighbours == "with_ties":
        # Every candidate at most as far as the k-th nearest counts, so the result does
        # not depend on the order of the rollouts.
        nearest = torch.sort(dist, dim=-1).values
        available = torch.isfinite(nearest).sum(-1)
        k = torch.minimum(query_k, available).clamp_min(1)
        kth = nearest.gather(-1, (k - 1)[:, :, None])
        return valid[:, :, None] & torch.isfinite(dist) & (dist <= kth)
    # Exactly k: among candidates tied at the k-th distance the earlier ones in candidate
    # order count. Sorting float32 keys makes distances equal up to rounding ties.
    order = torch.sort(dist.float(), dim=-1, stable=True).indices
    positions = torch.arange(dist.shape[-1], device=dist.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, positions)
    return valid[:, :, None] & torch.isfinite(dist) & (rank < query_k[:, :, None])


@dataclass(frozen=True)
class HistaNeighbour:
    """One neighbour of a node: a node of ``rollout`` at response token ``token``.

    ``weight`` is its share of the node's value (the shares of a node sum to 1; the value
    is the sum of share × the neighbour's reward); ``distance`` is the clamped prefix
    distance the weight came from.
    """

    rollout: int
    token: int
    weight: float
    distance: float


@dataclass(frozen=True)
class HistaNode:
    """An interior node of a rollout (at response token ``token``) and its neighbours,
    nearest first; none when no candidate was left (the node then has the group mean)."""

    token: int
    neighbours: tuple[HistaNeighbour, ...]


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
    node k gets that node's neighbour estimate. With ``end_node = "last_token"`` a rewarded
    rollout's last token is a segment of its own valued at its reward. Computed on the
    device of ``hidden``.
    """
    _check_hidden(hidden, prompt_len, lengths)
    reps = hista_representation(hidden, config)
    return _hista(reps, prompt_len, lengths, rewards, rewarded, config, explain=False)[0]


def hista_values_explained(
    hidden: Sequence[torch.Tensor],
    prompt_len: int,
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    config: HistaConfig,
) -> tuple[ValueEstimate, list[list[HistaNode]]]:
    """:func:`hista_values` and, per rollout, its interior nodes with their neighbours.

    The values are those of :func:`hista_values`, from the same computation.
    """
    _check_hidden(hidden, prompt_len, lengths)
    reps = hista_representation(hidden, config)
    estimate, nodes = _hista(reps, prompt_len, lengths, rewards, rewarded, config, explain=True)
    assert nodes is not None
    return estimate, nodes


def hista_values_from_states(
    states: Sequence[torch.Tensor],
    prompt_len: int,
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    config: HistaConfig,
    *,
    explain: bool = False,
) -> tuple[ValueEstimate, list[list[HistaNode]] | None]:
    """Hista values of one group from its representations (sent by the trainer).

    ``states[i]`` is rollout i's smoothed, downsampled hidden states as
    :func:`hista_representation` makes them, unpadded: (m_i, D), where m_i is what
    ``statevalue_client.states.representation_counts`` gives for its lengths (the caller
    checks). With ``explain``, also each rollout's interior nodes and their neighbours.
    """
    if len(states) != len(lengths):
        raise ValueError(f"{len(states)} representations for {len(lengths)} rollouts")
    counts = np.array([len(s) for s in states], dtype=np.int64)
    reps = pad_sequence([s.float() for s in states], batch_first=True)
    return _hista((reps, counts), prompt_len, lengths, rewards, rewarded, config, explain=explain)


def _check_hidden(hidden: Sequence[torch.Tensor], prompt_len: int, lengths: Sequence[int]) -> None:
    if len(hidden) != len(lengths):
        raise ValueError(f"{len(hidden)} hidden-state tensors for {len(lengths)} rollouts")
    for i, (states, length) in enumerate(zip(hidden, lengths, strict=True)):
        if states.dim() != 2 or states.shape[0] != prompt_len + length or states.shape[0] == 0:
            raise ValueError(
                f"hidden[{i}] has shape {tuple(states.shape)}, expected "
                f"({prompt_len + length}, H) with at least one row"
            )


def _hista(
    representation: tuple[torch.Tensor, np.ndarray],
    prompt_len: int,
    lengths: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    config: HistaConfig,
    *,
    explain: bool,
) -> tuple[ValueEstimate, list[list[HistaNode]] | None]:
    rewards, rewarded, mean = check_group(lengths, rewards, rewarded)
    config = group_node_spacing(lengths, rewarded, config)
    nodes = [hista_nodes(prompt_len, length, config) for length in lengths]
    queries = [i for i, n in enumerate(nodes) if len(n.interior)]
    node_values: dict[int, np.ndarray] = {}
    explained: dict[int, list[HistaNode]] = {}
    if queries:
        node_values, explained = _interior_values(
            representation, prompt_len, nodes, queries, rewards, rewarded, mean, config, explain
        )

    values, boundaries = [], []
    for i, length in enumerate(lengths):
        interior = nodes[i].interior
        starts = np.concatenate([[0], interior]).astype(np.int64)
        segment_values = np.concatenate([[mean], node_values.get(i, np.zeros(0))])
        if length == 0:
            starts, segment_values = np.zeros(0, dtype=np.int64), np.zeros(0)
        elif config.end_node == "last_token" and rewarded[i]:
            # The reference's end node is the last token: valued at the reward, so its
            # segment advantage is R − R = 0.
            if length == 1:
                starts, segment_values = np.zeros(1, dtype=np.int64), np.array([rewards[i]])
            else:
                starts = np.append(starts, length - 1)
                segment_values = np.append(segment_values, rewards[i])
        boundaries.append(starts)
        values.append(piecewise(starts, segment_values, length))
    estimate = ValueEstimate(values=values, boundaries=boundaries)
    if not explain:
        return estimate, None
    return estimate, [explained.get(i, []) for i in range(len(lengths))]


def _interior_values(
    representation: tuple[torch.Tensor, np.ndarray],
    prompt_len: int,
    nodes: Sequence[HistaNodes],
    queries: Sequence[int],
    rewards: np.ndarray,
    rewarded: np.ndarray,
    mean: float,
    config: HistaConfig,
    explain: bool,
) -> tuple[dict[int, np.ndarray], dict[int, list[HistaNode]]]:
    """Neighbour estimate at every interior node of each rollout in ``queries``, and with
    ``explain`` the neighbours behind each (empty otherwise)."""
    reps, counts = representation
    device = reps.device

    def prefix_len(i: int, positions: np.ndarray) -> np.ndarray:
        return node_prefix_lengths(prompt_len, positions, int(counts[i]), config)

    # Query side: the interior nodes of every rollout that has some.
    query_pos = [nodes[i].interior for i in queries]
    query_len = _padded(
        [prefix_len(i, b) for i, b in zip(queries, query_pos, strict=True)], 1, device
    )
    query_bound = _padded(query_pos, 0, device)
    query_k = _padded(
        [
            neighbour_counts(len(b), config.k_max, config.k_min, config.k_schedule)
            for b in query_pos
        ],
        0,
        device,
    )
    valid_query = query_k > 0
    # Candidate side: start, interior and end nodes of every rewarded rollout.
    cands = np.flatnonzero(rewarded)
    cand_pos = [nodes[j].candidates for j in cands]
    cand_len = _padded([prefix_len(j, b) for j, b in zip(cands, cand_pos, strict=True)], 1, device)
    cand_bound = _padded(cand_pos, _NO_NODE, device)
    cand_prefix = _padded(
        [prefix_len(j, b) for j, b in zip(cands, cand_pos, strict=True)], _NO_NODE, device
    )

    query_rollout = torch.as_tensor(queries, device=device)
    cand_rollout = torch.as_tensor(cands, device=device)
    dist = _cross_prefix_distances(reps, query_rollout, cand_rollout, query_len, cand_len)
    d_min = config.d_min
    if config.relative_d_min > 0 and len(cands) > 1:
        d_min = config.relative_d_min * group_distance_scale(reps, counts, cands)
    dist = dist.flatten(2).clamp_min(max(d_min, _MIN_D_MIN))
    # Only real candidate nodes, rollout by rollout: the reference's candidate order.
    real = torch.nonzero(cand_bound.flatten() != _NO_NODE).flatten()
    dist = dist[:, :, real]
    cand_owner = cand_rollout.repeat_interleave(cand_len.shape[1])[real]
    own = cand_owner[None, None, :] == query_rollout[:, None, None]
    if config.own_nodes == "prefix_length":
        beyond = cand_prefix.flatten()[real][None, None, :] > query_len[:, :, None]
    else:
        beyond = cand_bound.flatten()[real][None, None, :] > query_bound[:, :, None]
    excluded = own & beyond
    if config.own_weight == 0:
        excluded = excluded | own
    dist = dist.masked_fill(excluded, math.inf)
    cand_reward = torch.as_tensor(rewards[cands], device=device).repeat_interleave(
        cand_len.shape[1]
    )[real]
    chosen = _select_neighbours(dist, valid_query, query_k, config)
    weight = torch.where(chosen, dist.double().pow(-config.tau), 0.0)
    weight = torch.where(own, weight * config.own_weight, weight)
    total = weight.sum(-1)
    # No candidate at all (own nodes excluded and no other rewarded rollout): group mean.
    estimates = torch.where(total > 0, (weight * cand_reward).sum(-1) / total, mean)
    estimates = estimates.cpu().numpy()
    values = {i: estimates[row, : len(query_pos[row])] for row, i in enumerate(queries)}
    if not explain:
        return values, {}
    share = torch.where(total[:, :, None] > 0, weight / total[:, :, None], 0.0).cpu().numpy()
    distance = dist.cpu().numpy()
    picked = chosen.cpu().numpy()
    owner = cand_owner.cpu().numpy()
    position = cand_bound.flatten()[real].cpu().numpy()
    explained: dict[int, list[HistaNode]] = {}
    for row, i in enumerate(queries):
        explained[i] = []
        for a, token in enumerate(query_pos[row].tolist()):
            chosen_at = np.flatnonzero(picked[row, a])
            # Nearest first; equal distances in candidate order.
            chosen_at = chosen_at[np.argsort(distance[row, a, chosen_at], kind="stable")]
            neighbours = tuple(
                HistaNeighbour(
                    int(owner[n]),
                    int(position[n]),
                    float(share[row, a, n]),
                    float(distance[row, a, n]),
                )
                for n in chosen_at
            )
            explained[i].append(HistaNode(int(token), neighbours))
    return values, explained
