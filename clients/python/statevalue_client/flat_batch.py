"""Trainer tensors <-> groups: the bridge between a padded RL batch and the service.

Trainers hold a step's rollouts as one flat batch: left-padded prompts, right-padded
responses with a mask, a scalar reward per row and a group index (verl's ``uid``,
TRL's ``index // num_generations``). These helpers gather rows into whole groups
whatever order the batch is in, and scatter the answers back into padded
``[batch, response_length]`` float32 arrays.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from statevalue_client.wire import EstimateResult, Group, Rollout


@dataclass(frozen=True)
class BatchLayout:
    """Where each row of the flat batch went: ``rows[g][j]`` is group g's rollout j."""

    rows: list[list[int]]
    batch_size: int
    response_length: int


def _as_numpy(x: object) -> np.ndarray:
    # Accepts numpy arrays, lists and CPU torch tensors without importing torch.
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[attr-defined]
    return np.asarray(x)


def groups_from_flat_batch(
    prompt_ids: object,
    prompt_mask: object,
    response_ids: object,
    response_mask: object,
    rewards: object,
    group_index: Sequence[Hashable] | object,
    *,
    prompt_keys: Sequence[str] | None = None,
    token_rewards: object | None = None,
) -> tuple[list[Group], BatchLayout]:
    """Whole groups from a flat batch.

    Args:
        prompt_ids, prompt_mask: ``[B, P]``, prompts left-padded (mask 1 on real tokens).
        response_ids, response_mask: ``[B, L]``, responses right-padded.
        rewards: ``[B]`` scalar rewards; NaN marks a query row (values only).
        group_index: ``[B]`` group key of each row (ints or strings).
        prompt_keys: optional ``[B]`` stable prompt ids, so Numca accumulates across steps.
        token_rewards: optional ``[B, L]`` per-token rewards (KL folded in).
    """
    prompts = _as_numpy(prompt_ids)
    pmask = _as_numpy(prompt_mask).astype(bool)
    responses = _as_numpy(response_ids)
    rmask = _as_numpy(response_mask).astype(bool)
    scores = _as_numpy(rewards).astype(np.float64).reshape(-1)
    keys = list(_as_numpy(group_index).reshape(-1).tolist())
    per_token = None if token_rewards is None else _as_numpy(token_rewards).astype(np.float64)
    batch, length = responses.shape
    if not (len(prompts) == len(scores) == len(keys) == batch):
        raise ValueError(
            "prompt_ids, response_ids, rewards and group_index need the same batch size"
        )
    order: dict[Hashable, int] = {}
    groups: list[Group] = []
    rows: list[list[int]] = []
    for row in range(batch):
        key = keys[row]
        if key not in order:
            order[key] = len(groups)
            groups.append(
                Group(
                    prompt_ids=prompts[row][pmask[row]].astype(np.int32),
                    rollouts=[],
                    group_id=str(key),
                    prompt_id="" if prompt_keys is None else str(prompt_keys[row]),
                )
            )
            rows.append([])
        valid = np.flatnonzero(rmask[row])
        n = int(valid[-1]) + 1 if valid.size else 0
        reward = None if np.isnan(scores[row]) else float(scores[row])
        groups[order[key]].rollouts.append(
            Rollout(
                response_ids=responses[row, :n].astype(np.int32),
                reward=reward,
                token_rewards=None if per_token is None or reward is None else per_token[row, :n],
            )
        )
        rows[order[key]].append(row)
    return groups, BatchLayout(rows=rows, batch_size=batch, response_length=length)


def scatter_to_padded(
    result: EstimateResult, layout: BatchLayout, response_mask: object | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per method: ``(values, advantages)`` as ``[B, L]`` float32, zero outside the mask."""
    methods = result.groups[0].rollouts[0].values.keys() if result.groups else []
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    shape = (layout.batch_size, layout.response_length)
    for method in methods:
        values = np.zeros(shape, dtype=np.float32)
        advantages = np.zeros(shape, dtype=np.float32)
        for group_rows, group in zip(layout.rows, result.groups, strict=True):
            for row, rollout in zip(group_rows, group.rollouts, strict=True):
                n = len(rollout.values[method])
                values[row, :n] = rollout.values[method]
                advantages[row, :n] = rollout.advantages[method]
        if response_mask is not None:
            mask = _as_numpy(response_mask).astype(bool)
            values[~mask] = 0.0
            advantages[~mask] = 0.0
        out[method] = (values, advantages)
    return out
