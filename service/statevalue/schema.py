"""Engine-level request and result types, shared by the CLI and both front ends."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from statevalue.backends.base import ModelIdentity
from statevalue.config import EstimatorConfig, Method


@dataclass
class RolloutInput:
    """One sampled response: token ids (fast path) or text, and its reward.

    A rollout without a reward is a query (a partial trajectory): it gets values but adds
    nothing to the group's statistics. ``token_rewards`` (one per response token, e.g. with
    a KL penalty folded in) replace the terminal reward inside GAE.
    """

    response_ids: np.ndarray | None = None
    response_text: str | None = None
    reward: float | None = None
    token_rewards: np.ndarray | None = None


@dataclass
class GroupInput:
    """One prompt and its G rollouts. Give exactly one of prompt_ids, prompt_text, messages.

    With a ``prompt_id``, Numca counts the group in that prompt's table once per
    ``idempotency_key`` (default: ``group_id``; neither: every time it is sent).
    """

    rollouts: list[RolloutInput]
    group_id: str = ""
    prompt_id: str | None = None
    idempotency_key: str = ""
    prompt_ids: np.ndarray | None = None
    prompt_text: str | None = None
    messages: list[dict[str, str]] | None = None


@dataclass
class EstimateRequest:
    """A batch of groups, the methods to run and the estimator parameters.

    ``step_id`` is shared by the requests a client split one training step into.
    """

    groups: list[GroupInput]
    methods: tuple[Method, ...] = ("numca", "hista", "group_mean")
    config: EstimatorConfig = field(default_factory=EstimatorConfig)
    min_model_revision: int = 0
    step_id: str = ""


@dataclass
class RolloutResult:
    """Per method: values and advantages (len = response length) and segment starts."""

    values: dict[str, np.ndarray]
    advantages: dict[str, np.ndarray]
    boundaries: dict[str, np.ndarray]


@dataclass
class GroupResult:
    group_id: str
    rollouts: list[RolloutResult]


@dataclass
class EstimateResult:
    model: ModelIdentity
    groups: list[GroupResult]
    forward_seconds: float = 0.0
    estimator_seconds: float = 0.0


class InvalidRequest(ValueError):
    """A request the engine refuses; ``field`` names the offending input (dotted path)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
