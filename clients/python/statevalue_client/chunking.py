"""Splitting one training step into requests under a server's per-request limits.

Pure planning over group sizes and ids: which groups go together in which request. Groups
are never split; groups sharing a ``prompt_id`` travel in one request when they fit, so
Numca reads that prompt's table with the whole step's groups of it added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Lists of group names in error messages stop after this many.
_NAMES_SHOWN = 20


@dataclass(frozen=True)
class RequestLimits:
    """A server's per-request limits; 0 means the server sets none."""

    max_tokens: int = 0
    max_groups: int = 0


@dataclass(frozen=True)
class StepProgress:
    """How far a step is, after each of its requests: passed to ``progress`` callbacks.

    ``eta_s``: seconds left at the rate the step's tokens have been answered so far (None
    before the first answer). Groups finished by an earlier, failed try of the same step
    count as done from the start.
    """

    requests_done: int
    requests_total: int
    groups_done: int
    groups_total: int
    tokens_done: int
    tokens_total: int
    elapsed_s: float = 0.0
    eta_s: float | None = None


def group_name(group_id: str, index: int) -> str:
    """The group's id, or its position in the step as the server names unnamed groups."""
    return group_id or f"groups[{index}]"


def name_list(names: Sequence[str]) -> str:
    """``a, b, c`` with a count instead of the tail of a long list."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


def check_unique_ids(group_ids: Sequence[str]) -> None:
    """Raise ValueError naming every non-empty group id that occurs more than once."""
    seen: dict[str, list[int]] = {}
    for index, group_id in enumerate(group_ids):
        if group_id:
            seen.setdefault(group_id, []).append(index)
    repeated = {gid: at for gid, at in seen.items() if len(at) > 1}
    if repeated:
        described = [
            f"{gid!r} (groups {', '.join(str(i) for i in at)})" for gid, at in repeated.items()
        ]
        raise ValueError(f"duplicate group ids in one step: {name_list(described)}")


def plan_requests(
    tokens: Sequence[int],
    prompt_ids: Sequence[str],
    group_ids: Sequence[str],
    limits: RequestLimits,
    target_tokens: int = 0,
) -> list[list[int]]:
    """Group indices per request, every request within ``limits``.

    Args:
        tokens: prompt+response tokens of each group (the server's measure of work).
        prompt_ids: each group's ``prompt_id`` ("" for none); equal ones stay together
            unless together they exceed one request's limits.
        group_ids: for error messages.
        limits: the server's limits.
        target_tokens: the size to aim at (a few seconds of the server's work; 0: none):
            as many requests as that takes, though never a group split or over a limit.

    The requests are of similar size (the step's tokens spread evenly over the fewest
    requests the limits and the target allow), so several replicas finish at about the
    same time.

    Raises:
        ValueError: a single group is over the token limit (a group is never split).
    """
    max_tokens = limits.max_tokens or sum(tokens) or 1
    max_groups = limits.max_groups or len(tokens) or 1
    too_big = [
        f"{group_name(group_ids[i], i)} ({tokens[i]} tokens)"
        for i in range(len(tokens))
        if tokens[i] > max_tokens
    ]
    if too_big:
        raise ValueError(
            f"over the server's per-request limit of {max_tokens} prompt+response tokens, "
            f"and a group is never split: {name_list(too_big)}"
        )
    bundles: dict[str, list[int]] = {}
    for index, prompt_id in enumerate(prompt_ids):
        bundles.setdefault(prompt_id or f"\0{index}", []).append(index)
    pieces: list[list[int]] = []
    for members in bundles.values():
        pieces.extend(_fill(members, tokens, max_tokens, max_groups, max_tokens, max_groups))
    total = sum(tokens)
    per_request = min(max_tokens, target_tokens) if target_tokens > 0 else max_tokens
    count = max(-(-total // per_request), -(-len(tokens) // max_groups), 1)
    requests: list[list[int]] = []
    for piece in _fill(
        list(range(len(pieces))),
        [sum(tokens[i] for i in piece) for piece in pieces],
        max_tokens,
        max_groups,
        -(-total // count),
        -(-len(tokens) // count),
        sizes=[len(piece) for piece in pieces],
    ):
        requests.append([index for p in piece for index in pieces[p]])
    return requests


def _fill(
    items: list[int],
    tokens: Sequence[int],
    max_tokens: int,
    max_groups: int,
    target_tokens: int,
    target_groups: int,
    sizes: Sequence[int] | None = None,
) -> list[list[int]]:
    """Consecutive runs of ``items``: a run closes at the hard limits or once it reaches a
    target. ``tokens`` and ``sizes`` (groups, 1 each by default) are indexed by item."""
    runs: list[list[int]] = []
    run: list[int] = []
    run_tokens = run_groups = 0
    for item in items:
        size = 1 if sizes is None else sizes[item]
        full = run_tokens >= target_tokens or run_groups >= target_groups
        over = run_tokens + tokens[item] > max_tokens or run_groups + size > max_groups
        if run and (full or over):
            runs.append(run)
            run, run_tokens, run_groups = [], 0, 0
        run.append(item)
        run_tokens += tokens[item]
        run_groups += size
    if run:
        runs.append(run)
    return runs
