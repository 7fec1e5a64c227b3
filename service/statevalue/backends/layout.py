"""How the sequences of one forward call are laid out: shared prompts and packed rows.

Pure planning over token ids (numpy) plus the attention mask of a packed row; no model.
A backend uses it to run each group's shared prompt once and to pack sequences of mixed
lengths without padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PrefixGroup:
    """Sequences (indices into the call's list) that begin with the same ``prefix_length`` ids.

    Every member is longer than the prefix, so each has at least one token of its own.
    ``prefix_length`` 0 means the members share nothing and run as independent sequences.
    """

    prefix_length: int
    members: tuple[int, ...]


def group_shared_prefixes(
    sequences: Sequence[np.ndarray], prefix_lengths: Sequence[int] | None
) -> list[PrefixGroup]:
    """Group sequences by the prefix they were hinted to share, checked on the ids themselves.

    ``prefix_lengths[i]`` is how many leading tokens of sequence i are a prompt it may share
    with other sequences of the call. Sequences group only when those tokens are identical,
    so a wrong hint costs speed, never correctness. A hint is capped one short of the
    sequence's length so that every member keeps a token of its own. Sequences that share
    with nobody end up together in one group of prefix length 0.
    """
    if prefix_lengths is None:
        return [PrefixGroup(0, tuple(range(len(sequences))))] if len(sequences) else []
    if len(prefix_lengths) != len(sequences):
        raise ValueError(f"{len(prefix_lengths)} prefix lengths for {len(sequences)} sequences")
    by_prefix: dict[tuple[int, bytes], list[int]] = {}
    for index, (sequence, hint) in enumerate(zip(sequences, prefix_lengths, strict=True)):
        length = max(0, min(int(hint), len(sequence) - 1))
        key = (length, np.asarray(sequence[:length], dtype=np.int64).tobytes())
        by_prefix.setdefault(key, []).append(index)
    groups: list[PrefixGroup] = []
    alone: list[int] = []
    for (length, _), members in by_prefix.items():
        if length == 0 or len(members) == 1:
            alone.extend(members)
        else:
            groups.append(PrefixGroup(length, tuple(members)))
    if alone:
        groups.append(PrefixGroup(0, tuple(sorted(alone))))
    return groups


@dataclass(frozen=True)
class Segment:
    """A span of a packed row: a shared prefix or one sequence's own tokens.

    The span holds ``sequences[source][offset : offset + length]`` from row position
    ``start``. ``parent`` is the index (in the row) of the prefix span that the tokens
    continue; None for a prefix itself or a sequence that shares nothing.
    """

    source: int
    is_prefix: bool
    start: int
    length: int
    offset: int
    parent: int | None


def pack_rows(
    lengths: Sequence[int], groups: Sequence[PrefixGroup], max_row_tokens: int
) -> list[list[Segment]]:
    """Pack every sequence into rows of at most ``max_row_tokens`` tokens (one may exceed it).

    A shared prefix is written once per row, followed by the own tokens of as many members
    as fit; a group that does not fit in one row repeats its prefix in the next. Rows are
    filled greedily in the order given; a sequence longer than the budget gets a row alone.
    """
    rows: list[list[Segment]] = []
    row: list[Segment] = []
    used = 0

    def close_row() -> None:
        nonlocal row, used
        if row:
            rows.append(row)
        row, used = [], 0

    for group in groups:
        prefix = group.prefix_length
        prefix_segment: int | None = None
        for index in group.members:
            own = lengths[index] - prefix
            needed = own + (prefix if prefix_segment is None else 0)
            if row and used + needed > max_row_tokens:
                close_row()
                prefix_segment = None
            if prefix and prefix_segment is None:
                prefix_segment = len(row)
                row.append(Segment(index, True, used, prefix, 0, None))
                used += prefix
            row.append(Segment(index, False, used, own, prefix, prefix_segment))
            used += own
    close_row()
    return rows


def row_positions(row: Sequence[Segment]) -> np.ndarray:
    """Position ids of a packed row: each span continues its sequence's own numbering."""
    return np.concatenate([np.arange(s.offset, s.offset + s.length) for s in row])


def row_attention_mask(
    row: Sequence[Segment], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive (1, 1, N, N) mask of a packed row: 0 where a query may attend, else -inf-like.

    A token sees the earlier tokens of its own span and, when its span continues a shared
    prefix, that whole prefix (which lies before it); so every sequence has exactly the
    causal context it would have alone.
    """
    span = np.concatenate([np.full(s.length, i) for i, s in enumerate(row)])
    parent_span = np.array([i if s.parent is None else s.parent for i, s in enumerate(row)])
    span_t = torch.from_numpy(span).to(device)
    parent_t = torch.from_numpy(parent_span[span]).to(device)
    position = torch.arange(len(span), device=device)
    visible = (span_t[None, :] == span_t[:, None]) | (span_t[None, :] == parent_t[:, None])
    visible &= position[None, :] <= position[:, None]
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]
