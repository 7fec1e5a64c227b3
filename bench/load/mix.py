"""The request every load scenario sends: one group of 4 rollouts x 64 response tokens
after a 32-token prompt, rewards 0/1, all three methods (bench/load/)."""

from __future__ import annotations

from typing import Any

import numpy as np

from statevalue_client import Group, Rollout

PROMPT_TOKENS, ROLLOUTS, RESPONSE_TOKENS = 32, 4, 64
METHODS = ("numca", "hista", "group_mean")


def make_group(rng: np.random.Generator) -> Group:
    """One random group of in-vocabulary ids (the embedded model's vocabulary is 49152)."""
    ids = rng.integers(100, 40_000, size=PROMPT_TOKENS + ROLLOUTS * RESPONSE_TOKENS)
    prompt, responses = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:].reshape(ROLLOUTS, -1)
    return Group(
        prompt_ids=prompt.astype(np.int32),
        rollouts=[Rollout(r.astype(np.int32), float(j % 2)) for j, r in enumerate(responses)],
        group_id="load",
    )


def as_json(group: Group) -> dict[str, Any]:
    return {
        "methods": list(METHODS),
        "groups": [
            {
                "group_id": group.group_id,
                "prompt_ids": np.asarray(group.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in group.rollouts
                ],
            }
        ],
    }
