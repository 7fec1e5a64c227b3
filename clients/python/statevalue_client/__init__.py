"""Python client of the statevalue service: per-token values for LLM RL trainers."""

from statevalue_client.client import (
    AsyncValueClient,
    EstimateResult,
    Group,
    GroupResult,
    ModelInfo,
    Rollout,
    RolloutResult,
    ValueClient,
)
from statevalue_client.flat_batch import BatchLayout, groups_from_flat_batch, scatter_to_padded

__all__ = [
    "AsyncValueClient",
    "BatchLayout",
    "EstimateResult",
    "Group",
    "GroupResult",
    "ModelInfo",
    "Rollout",
    "RolloutResult",
    "ValueClient",
    "groups_from_flat_batch",
    "scatter_to_padded",
]
