"""JSON wire models (HTTP API and the CLI's JSON lines), mirroring proto/statevalue/v1.

Field names match the .proto messages; ``tests/test_api_models.py`` checks that they stay
in step.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import numpy as np
from pydantic import Base64Bytes, BaseModel, ConfigDict, Field, StrictInt

from statevalue.config import METHODS, EstimatorConfig
from statevalue.estimators.advantages import RewardStatistics
from statevalue.estimators.hista import HistaNode
from statevalue.estimators.self_calibration import SelfCalibration
from statevalue.schema import (
    EstimateRequest,
    EstimateResult,
    GroupInput,
    RolloutExplanation,
    RolloutInput,
    states_format,
)
from statevalue_client.states import StatesFormat

# Token ids travel as int32 on the gRPC wire; the same range keeps huge JSON integers a
# schema error instead of an overflow when they become arrays. Strict: "5" is not an id.
TokenId = Annotated[StrictInt, Field(ge=-(2**31), lt=2**31)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(_Wire):
    role: str = Field(description="'system', 'user' or 'assistant'.")
    content: str


class RolloutIn(_Wire):
    response_ids: list[TokenId] | None = Field(None, description="Response token ids (fast path).")
    response_text: str | None = Field(None, description="Response text, tokenised server-side.")
    reward: float | None = Field(None, description="Scalar reward; omit for a query rollout.")
    token_rewards: list[float] | None = Field(
        None, description="Optional per-token rewards (e.g. KL folded in), one per response token."
    )
    hista_states: Base64Bytes | None = Field(
        None,
        description="With the request's hista_states: this rollout's Hista representation "
        "after the prompt part, packed as the format says, base64.",
    )
    num_hista_states: int = Field(0, ge=0, description="Vectors in hista_states.")

    @classmethod
    def from_input(cls, rollout: RolloutInput) -> RolloutIn:
        return cls(
            response_ids=_ids(rollout.response_ids),
            response_text=rollout.response_text,
            reward=rollout.reward,
            token_rewards=None
            if rollout.token_rewards is None
            else np.asarray(rollout.token_rewards, dtype=np.float64).tolist(),
            hista_states=rollout.hista_states or None,
            num_hista_states=rollout.num_hista_states,
        )


class GroupIn(_Wire):
    group_id: str = Field("", description="Echoed back; defaults to the group's position.")
    prompt_id: str | None = Field(
        None, description="Stable id of the prompt across steps: Numca accumulates its table."
    )
    idempotency_key: str = Field(
        "",
        description="With a prompt_id, Numca counts the group once per key (retries never "
        "count twice). Default: group_id; neither: counted every time it is sent.",
    )
    prompt_ids: list[TokenId] | None = None
    prompt_text: str | None = None
    messages: list[ChatMessage] | None = None
    rollouts: list[RolloutIn]
    prompt_hista_states: Base64Bytes | None = Field(
        None,
        description="With the request's hista_states: the representation vectors inside the "
        "prompt, the same for every rollout, base64.",
    )
    prompt_num_hista_states: int = Field(0, ge=0, description="Vectors in prompt_hista_states.")

    def to_input(self) -> GroupInput:
        return GroupInput(
            rollouts=[
                RolloutInput(
                    response_ids=None
                    if r.response_ids is None
                    else np.asarray(r.response_ids, dtype=np.int64),
                    response_text=r.response_text,
                    reward=r.reward,
                    token_rewards=None if r.token_rewards is None else np.asarray(r.token_rewards),
                    hista_states=r.hista_states,
                    num_hista_states=r.num_hista_states,
                )
                for r in self.rollouts
            ],
            group_id=self.group_id,
            prompt_id=self.prompt_id,
            idempotency_key=self.idempotency_key,
            prompt_ids=None
            if self.prompt_ids is None
            else np.asarray(self.prompt_ids, dtype=np.int64),
            prompt_text=self.prompt_text,
            messages=None if self.messages is None else [m.model_dump() for m in self.messages],
            prompt_hista_states=self.prompt_hista_states,
            prompt_num_hista_states=self.prompt_num_hista_states,
        )

    @classmethod
    def from_input(cls, group: GroupInput) -> GroupIn:
        """The JSON form of an engine-side group, whichever front end it came from."""
        return cls(
            group_id=group.group_id,
            prompt_id=group.prompt_id,
            idempotency_key=group.idempotency_key,
            prompt_ids=_ids(group.prompt_ids),
            prompt_text=group.prompt_text,
            messages=None
            if group.messages is None
            else [ChatMessage.model_validate(m) for m in group.messages],
            rollouts=[RolloutIn.from_input(r) for r in group.rollouts],
            prompt_hista_states=group.prompt_hista_states or None,
            prompt_num_hista_states=group.prompt_num_hista_states,
        )


def _ids(ids: np.ndarray | None) -> list[int] | None:
    return None if ids is None else np.asarray(ids, dtype=np.int64).tolist()


# A small valid request: OpenAPI shows it, and API fuzzers start from it.
ESTIMATE_EXAMPLE = {
    "methods": ["numca", "hista", "group_mean"],
    "groups": [
        {
            "group_id": "g1",
            "prompt_ids": [1, 2, 3],
            "rollouts": [
                {"response_ids": [4, 5, 6], "reward": 1.0},
                {"response_ids": [7, 8], "reward": 0.0},
            ],
        }
    ],
}


class StepRewardsIn(_Wire):
    """Sufficient statistics of a step's rewards (its rewarded rollouts)."""

    count: int = Field(ge=1)
    mean: float = Field(allow_inf_nan=False)
    sum_squared_deviations: float = Field(ge=0, allow_inf_nan=False)

    def to_statistics(self) -> RewardStatistics:
        return RewardStatistics(self.count, self.mean, self.sum_squared_deviations)

    @classmethod
    def from_statistics(cls, stats: RewardStatistics) -> StepRewardsIn:
        return cls(
            count=stats.count, mean=stats.mean, sum_squared_deviations=stats.sum_squared_deviations
        )


class HistaStatesFormatIn(_Wire):
    """How the trainer made and packed the Hista representations (statevalue_client.states)."""

    dimension: int = Field(ge=1, description="Length of each vector.")
    ema_alpha: float = 0.7
    ema_start: str = "first"
    stride: int = Field(5, ge=1)
    downsample: str = "inclusive"
    layer: int = Field(-1, description="Hidden-state layer; -1 = the last.")
    dtype: str = Field("float32", description='"float32", "float16" or "bfloat16".')
    projection: str = Field("", description='"" (none) or "gaussian" (seeded).')
    projection_seed: int = Field(0, ge=0)

    def to_format(self) -> StatesFormat:
        return states_format(self.model_dump())


class EstimateIn(_Wire):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [ESTIMATE_EXAMPLE]})

    methods: list[str] = Field(default_factory=lambda: list(METHODS))
    params: EstimatorConfig = Field(default_factory=EstimatorConfig)
    groups: list[GroupIn]
    min_model_revision: int = Field(
        0, ge=0, description="Refuse (409) while the server's weights are older than this."
    )
    step_id: str = Field(
        "", description="Shared by the requests one training step was split into; logged."
    )
    explain: bool = Field(
        False,
        description="Also answer why each rollout got its values (its 'explanation'): token "
        "texts, Numca's number sets, Hista's neighbours with their weights.",
    )
    step_rewards: StepRewardsIn | None = Field(
        None,
        description="The rewards of the whole step this request is one part of: with "
        'advantage scale "batch" the advantages are divided by their std instead of this '
        "request's own, so a split step gets the advantages of one request.",
    )
    hista_states: HistaStatesFormatIn | None = Field(
        None,
        description="Set when every group carries the trainer's Hista representations: "
        "Hista runs on them, with no forward pass.",
    )

    def to_request(self) -> EstimateRequest:
        return EstimateRequest(
            groups=[g.to_input() for g in self.groups],
            methods=tuple(self.methods),  # type: ignore[arg-type]
            config=self.params,
            min_model_revision=self.min_model_revision,
            step_id=self.step_id,
            explain=self.explain,
            step_rewards=None if self.step_rewards is None else self.step_rewards.to_statistics(),
            hista_states=None if self.hista_states is None else self.hista_states.to_format(),
        )

    @classmethod
    def from_request(cls, request: EstimateRequest) -> EstimateIn:
        """The JSON form of an engine-side request (e.g. one that came over gRPC)."""
        return cls(
            methods=list(request.methods),
            params=request.config,
            groups=[GroupIn.from_input(g) for g in request.groups],
            min_model_revision=request.min_model_revision,
            step_id=request.step_id,
            explain=request.explain,
            step_rewards=None
            if request.step_rewards is None
            else StepRewardsIn.from_statistics(request.step_rewards),
            hista_states=None
            if request.hista_states is None
            else HistaStatesFormatIn(**request.hista_states.as_dict()),
        )


class ReloadIn(_Wire):
    checkpoint: str = Field(description="A checkpoint directory (safetensors) on the server.")
    version: str = Field("", description="Label for the new weights; default: a file digest.")


class ModelOut(_Wire):
    name: str
    version: str
    revision: int = 0


class ModelInfoOut(_Wire):
    """``GET /v1/model``: the served model, its limits and the default parameters."""

    name: str
    version: str
    vocab_size: int
    max_length: int
    hidden_size: int
    device: str
    revision: int = Field(description="Weight reloads since the server started.")
    max_request_tokens: int = Field(description="Prompt+response tokens in one request.")
    max_request_groups: int = Field(description="Groups in one request.")
    default_params: dict[str, dict[str, Any]] = Field(
        description="The estimator parameters the server's params file sets (serve --params), "
        "which fill what a request leaves unset; every other field is the built-in default."
    )
    backend: str = Field(
        description='The model backend: "torch", "vllm" or "none" (Hista only from '
        "representations the trainer sends)."
    )
    forward_path: str = Field(description="How sequences go through the model.")
    tokens_per_second: float = Field(
        description="Measured forward throughput in prompt+response tokens per second "
        "(0 before the first measurement); clients size requests by it."
    )


class HistaNeighbourOut(_Wire):
    rollout: int = Field(description="The neighbour node's rollout (index in the group).")
    token: int = Field(description="The neighbour node's response token index.")
    weight: float = Field(description="Share of the node's value; a node's shares sum to 1.")
    distance: float = Field(description="Prefix distance after the clamp.")


class HistaNodeOut(_Wire):
    token: int = Field(description="Response token index of the interior node.")
    neighbours: list[HistaNeighbourOut] = Field(description="Nearest first.")

    @classmethod
    def from_node(cls, node: HistaNode) -> HistaNodeOut:
        return cls(
            token=node.token,
            neighbours=[
                HistaNeighbourOut(
                    rollout=n.rollout, token=n.token, weight=n.weight, distance=n.distance
                )
                for n in node.neighbours
            ],
        )


class RolloutExplanationOut(_Wire):
    tokens: list[str] = Field(description="The text of each response token.")
    numca_states: list[list[str]] | None = Field(
        None, description="The numbers of each Numca segment's state, one per Numca boundary."
    )
    numca_final_state: list[str] | None = Field(
        None, description="The Numca state reached after the last token, if any."
    )
    hista_nodes: list[HistaNodeOut] | None = Field(
        None, description="Every interior Hista node with its neighbours."
    )

    @classmethod
    def from_explanation(cls, explanation: RolloutExplanation) -> RolloutExplanationOut:
        return cls(
            tokens=explanation.tokens,
            numca_states=explanation.numca_states,
            numca_final_state=explanation.numca_final_state,
            hista_nodes=None
            if explanation.hista_nodes is None
            else [HistaNodeOut.from_node(n) for n in explanation.hista_nodes],
        )


class RolloutOut(_Wire):
    values: dict[str, list[float]]
    advantages: dict[str, list[float]]
    boundaries: dict[str, list[int]]
    explanation: RolloutExplanationOut | None = Field(
        None, description="Only when the request set explain."
    )


class SelfCalibrationOut(_Wire):
    params: dict[str, dict[str, Any]] = Field(
        description="The chosen settings of each estimator in the blend (grid fields only)."
    )
    weights: dict[str, float] = Field(description="The blend's weight per method; sum 1.")
    own_weight: float = Field(description="The mean of own_weights.")
    own_weights: list[float] = Field(
        description="value = a·R_i + (1 − a)·(blend without rollout i), a = own_weights[p] "
        "in the p-th of len(own_weights) equal parts of the response."
    )
    criterion: float = Field(
        description="Leave-one-rollout-out mean squared error of the blend against the "
        "rollouts' rewards, over the scope."
    )
    group_mean_criterion: float = Field(description="The same for the group mean.")
    candidates: int = Field(description="How many settings and blends were compared.")
    scope: str = Field(description="'request' or 'group'.")

    @classmethod
    def from_choice(cls, choice: SelfCalibration) -> SelfCalibrationOut:
        return cls(**dataclasses.asdict(choice))


class GroupOut(_Wire):
    group_id: str
    rollouts: list[RolloutOut]
    self_calibration: dict[str, SelfCalibrationOut] | None = Field(
        None, description="Per method, only when params.self_calibration.enabled."
    )


class EstimateOut(_Wire):
    model: ModelOut
    groups: list[GroupOut]

    @classmethod
    def from_result(cls, result: EstimateResult) -> EstimateOut:
        return cls(
            model=ModelOut(
                name=result.model.name,
                version=result.model.version,
                revision=result.model.revision,
            ),
            groups=[
                GroupOut(
                    group_id=g.group_id,
                    rollouts=[
                        RolloutOut(
                            values={m: v.tolist() for m, v in r.values.items()},
                            advantages={m: v.tolist() for m, v in r.advantages.items()},
                            boundaries={m: v.tolist() for m, v in r.boundaries.items()},
                            explanation=None
                            if r.explanation is None
                            else RolloutExplanationOut.from_explanation(r.explanation),
                        )
                        for r in g.rollouts
                    ],
                    self_calibration={
                        m: SelfCalibrationOut.from_choice(c) for m, c in g.self_calibration.items()
                    }
                    or None,
                )
                for g in result.groups
            ],
        )


# The debug history (HTTP only, for the debug page): no gRPC counterpart.


class HistoryItemOut(_Wire):
    id: int
    time: float = Field(description="When it was answered, Unix seconds.")
    groups: int
    rollouts: int
    methods: list[str]
    model: ModelOut


class HistoryEntryOut(_Wire):
    id: int
    time: float = Field(description="When it was answered, Unix seconds.")
    request: dict[str, Any] = Field(description="The request as a body of POST /v1/estimate.")
    response: EstimateOut


def estimate_body(request: EstimateRequest) -> dict[str, Any]:
    """The JSON body of POST /v1/estimate that makes ``request``, whichever front end it
    came from, ready to be sent again: only the parameters the caller set (a full dump of
    the defaults would set both Hista clamps)."""
    body = EstimateIn.from_request(request).model_dump(mode="json", exclude_none=True)
    body["params"] = request.config.model_dump(mode="json", exclude_unset=True)
    return body
