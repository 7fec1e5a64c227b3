"""Python client of the statevalue service: per-token values for LLM RL trainers."""

from statevalue_client.chunking import RequestLimits, StepProgress
from statevalue_client.client import (
    AsyncValueClient,
    EstimateResult,
    Group,
    GroupResult,
    ModelInfo,
    ReloadFailed,
    ReloadResult,
    Rollout,
    RolloutResult,
    ValueClient,
)
from statevalue_client.flat_batch import BatchLayout, groups_from_flat_batch, scatter_to_padded
from statevalue_client.step import RetryPolicy, StepFailed

__all__ = [
    "AsyncValueClient",
    "BatchLayout",
    "EstimateResult",
    "Group",
    "GroupResult",
    "ModelInfo",
    "ReloadFailed",
    "ReloadResult",
    "RequestLimits",
    "RetryPolicy",
    "Rollout",
    "RolloutResult",
    "StepFailed",
    "StepProgress",
    "ValueClient",
    "groups_from_flat_batch",
    "scatter_to_padded",
]
