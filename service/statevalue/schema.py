"""Engine-level request and result types, shared by the CLI and both front ends."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statevalue.backends.base import ModelIdentity
from statevalue.config import EstimatorConfig, Method
from statevalue.estimators.advantages import RewardStatistics
from statevalue.estimators.hista import HistaNode
from statevalue.estimators.self_calibration import SelfCalibration
from statevalue_client.arrays import VECTOR_DTYPES
from statevalue_client.states import PROJECTIONS, StatesFormat


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
    # The trainer's Hista representation past the prompt part: packed bytes and count, in
    # the request's ``hista_states`` format (the engine decodes and checks them).
    hista_states: bytes | None = None
    num_hista_states: int = 0


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
    # The prompt part of the group's Hista representations, sent once (see RolloutInput).
    prompt_hista_states: bytes | None = None
    prompt_num_hista_states: int = 0


@dataclass
class EstimateRequest:
    """A batch of groups, the methods to run and the estimator parameters.

    ``step_id`` is shared by the requests a client split one training step into, and
    ``step_rewards`` are that whole step's rewards (batch scaling divides by their std). With
    ``explain`` every rollout's result also carries a :class:`RolloutExplanation`.
    ``hista_states``: set when every group carries the trainer's Hista representations.
    """

    groups: list[GroupInput]
    methods: tuple[Method, ...] = ("numca", "hista", "group_mean")
    config: EstimatorConfig = field(default_factory=EstimatorConfig)
    min_model_revision: int = 0
    step_id: str = ""
    explain: bool = False
    step_rewards: RewardStatistics | None = None
    hista_states: StatesFormat | None = None


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
    # Per method, when the request's self_calibration is enabled.
    self_calibration: dict[str, SelfCalibration] = field(default_factory=dict)


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


def states_format(values: Mapping[str, Any]) -> StatesFormat:
    """The format of a request's Hista representations; raises InvalidRequest naming the
    field (``hista_states.<name>``)."""
    choices = {"dtype": VECTOR_DTYPES, "projection": PROJECTIONS}
    for name, allowed in choices.items():
        if name in values and values[name] not in allowed:
            raise InvalidRequest(
                f"hista_states.{name}",
                f"{values[name]!r} is not one of {', '.join(repr(a) for a in allowed)}",
            )
    for name in ("dimension", "stride"):
        if int(values.get(name, 0)) < 1:
            raise InvalidRequest(f"hista_states.{name}", "must be at least 1")
    return StatesFormat(**values)
