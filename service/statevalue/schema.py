"""Engine-level request and result types, shared by the CLI and both front ends."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from statevalue.backends.base import ModelIdentity
from statevalue.config import EstimatorConfig, Method
from statevalue.estimators.advantages import RewardStatistics
from statevalue.estimators.hista import HistaNode


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

    ``step_id`` is shared by the requests a client split one training step into, and
    ``step_rewards`` are that whole step's rewards (batch scaling divides by their std). With
    ``explain`` every rollout's result also carries a :class:`RolloutExplanation`.
    """

    groups: list[GroupInput]
    methods: tuple[Method, ...] = ("numca", "hista", "group_mean")
    config: EstimatorConfig = field(default_factory=EstimatorConfig)
    min_model_revision: int = 0
    step_id: str = ""
    explain: bool = False
    step_rewards: RewardStatistics | None = None


@dataclass
class RolloutExplanation:
    """Why a rollout got its values, for people reading them (requested with ``explain``).

    ``tokens``: the text of each response token. ``numca_states``: the numbers (sorted) of
    the state of each Numca segment, one per Numca boundary; ``numca_final_state``: the
    state reached after the last token, if any. ``hista_nodes``: each interior Hista node
    with the neighbours that valued it. A method not run leaves its fields None.
    """

    tokens: list[str]
    numca_states: list[list[str]] | None = None
    numca_final_state: list[str] | None = None
    hista_nodes: list[HistaNode] | None = None


@dataclass
class RolloutResult:
    """Per method: values and advantages (len = response length) and segment starts;
    the explanation when the request asked for one."""

    values: dict[str, np.ndarray]
    advantages: dict[str, np.ndarray]
    boundaries: dict[str, np.ndarray]
    explanation: RolloutExplanation | None = None


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
