"""The client's data model and its protobuf form: groups in, values out.

Pure conversions between the dataclasses callers use and the wire messages of
proto/statevalue/v1; no channels, no threads. Both clients and the trainer adapters build
on these.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statevalue_client.arrays import FLOAT32, INT32, pack_float32, pack_int32, unpack
from statevalue_client.proto import statevalue_pb2 as pb
from statevalue_client.states import GroupStates, add_states_to_request


@dataclass
class Rollout:
    """One response as token ids; no reward makes it a query (values only, no statistics)."""

    response_ids: np.ndarray | Sequence[int]
    reward: float | None = None
    token_rewards: np.ndarray | Sequence[float] | None = None


@dataclass
class Group:
    """One prompt and its sampled rollouts. ``prompt_id`` lets Numca accumulate across steps.

    Numca counts a group with a ``prompt_id`` once per ``idempotency_key`` (default: its
    ``group_id``; without either, ``estimate()`` keys it by step id and position, so its
    own retries never count twice).
    """

    prompt_ids: np.ndarray | Sequence[int]
    rollouts: list[Rollout]
    group_id: str = ""
    prompt_id: str = ""
    idempotency_key: str = ""
    # Hista's representations from the trainer's own hidden states (statevalue_client.states).
    hista_states: GroupStates | None = None


@dataclass
class RolloutResult:
    """Per method name: float32 values and advantages (one per token) and int32 boundaries."""

    values: dict[str, np.ndarray]
    advantages: dict[str, np.ndarray]
    boundaries: dict[str, np.ndarray]


@dataclass
class GroupResult:
    """``self_calibration``: per method, what the server's self-calibration chose (params,
    weights, own_weight, own_weights, criterion, group_mean_criterion, candidates, scope);
    empty unless the request enabled it."""

    group_id: str
    rollouts: list[RolloutResult]
    self_calibration: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class ModelInfo:
    """The served model; ``max_request_*`` are the server's per-request limits (0: none).

    ``default_params`` (from ``model_info()``): the estimator parameters the server's params
    file sets, e.g. ``{"hista": {"node_spacing": 10}}``; they fill what a request leaves
    unset, and every other field is the server's built-in default.
    """

    name: str
    version: str
    vocab_size: int = 0
    max_length: int = 0
    hidden_size: int = 0
    device: str = ""
    revision: int = 0
    max_request_tokens: int = 0
    max_request_groups: int = 0
    default_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend: str = ""
    forward_path: str = ""
    tokens_per_second: float = 0.0


@dataclass
class EstimateResult:
    """Results in the order of the groups sent.

    ``model`` names the weights of the first request; ``models`` lists every distinct
    model that answered part of the step (more than one only if weights changed mid-step).
    ``forward_seconds`` and ``estimator_seconds`` are summed over the step's requests.
    """

    model: ModelInfo
    groups: list[GroupResult]
    forward_seconds: float = 0.0
    estimator_seconds: float = 0.0
    models: list[ModelInfo] = field(default_factory=list)
    step_id: str = ""


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The bearer-token metadata of ``token``; none without one."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


def build_request(
    groups: Iterable[Group],
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]],
    min_model_revision: int = 0,
    step_id: str = "",
) -> pb.EstimateRequest:
    """The protobuf request for ``groups``; ``params`` maps numca/hista/advantage to fields."""
    groups = list(groups)
    request = pb.EstimateRequest(
        methods=list(methods), min_model_revision=min_model_revision, step_id=step_id
    )
    for section, values in params.items():
        if section not in request.params.DESCRIPTOR.fields_by_name:
            known = ", ".join(request.params.DESCRIPTOR.fields_by_name)
            raise ValueError(f"unknown parameter section {section!r}: one of {known}")
        target = getattr(request.params, section)
        for name, value in values.items():
            if name not in target.DESCRIPTOR.fields_by_name:
                raise ValueError(f"unknown parameter {section}.{name}")
            setattr(target, name, value)
    for group in groups:
        message = request.groups.add(
            group_id=group.group_id,
            prompt_id=group.prompt_id,
            idempotency_key=group.idempotency_key,
            prompt_ids=pack_int32(group.prompt_ids),
            prompt_num_tokens=len(group.prompt_ids),
        )
        for rollout in group.rollouts:
            item = message.rollouts.add(
                response_ids=pack_int32(rollout.response_ids),
                num_tokens=len(rollout.response_ids),
            )
            if rollout.reward is not None:
                item.reward = float(rollout.reward)
            if rollout.token_rewards is not None:
                item.token_rewards = pack_float32(rollout.token_rewards)
    add_states_to_request(request, groups)
    return request


def reload_request(
    checkpoint: str, version: str, admin_token: str
) -> tuple[pb.ReloadWeightsRequest, tuple[tuple[str, str], ...]]:
    """The ReloadWeights message and its bearer-token metadata."""
    request = pb.ReloadWeightsRequest(checkpoint=checkpoint, version=version)
    return request, auth_metadata(admin_token)


def parse_model(info: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name,
        version=info.version,
        vocab_size=info.vocab_size,
        max_length=info.max_length,
        hidden_size=info.hidden_size,
        device=info.device,
        revision=info.revision,
        max_request_tokens=info.max_request_tokens,
        max_request_groups=info.max_request_groups,
        backend=info.backend,
        forward_path=info.forward_path,
        tokens_per_second=info.tokens_per_second,
        default_params={
            section.name: {f.name: value for f, value in message.ListFields()}
            for section, message in info.default_params.ListFields()
        },
    )


def parse_response(response: pb.EstimateResponse) -> EstimateResult:
    """Numpy views of the packed arrays of a response."""
    groups = []
    for group in response.groups:
        rollouts = []
        for rollout in group.rollouts:
            n = rollout.num_tokens
            methods = rollout.methods
            rollouts.append(
                RolloutResult(
                    values={m: unpack(o.values, FLOAT32, n, "values") for m, o in methods.items()},
                    advantages={
                        m: unpack(o.advantages, FLOAT32, n, "advantages")
                        for m, o in methods.items()
                    },
                    boundaries={m: unpack(o.boundaries, INT32) for m, o in methods.items()},
                )
            )
        calibration = {
            method: {
                "params": {
                    section.name: {f.name: value for f, value in message.ListFields()}
                    for section, message in choice.params.ListFields()
                },
                "weights": dict(choice.weights),
                "own_weight": choice.own_weight,
                "own_weights": list(choice.own_weights),
                "criterion": choice.criterion,
                "group_mean_criterion": choice.group_mean_criterion,
                "candidates": choice.candidates,
                "scope": choice.scope,
            }
            for method, choice in group.self_calibration.items()
        }
        groups.append(
            GroupResult(group_id=group.group_id, rollouts=rollouts, self_calibration=calibration)
        )
    return EstimateResult(
        model=parse_model(response.model),
        groups=groups,
        forward_seconds=response.forward_seconds,
        estimator_seconds=response.estimator_seconds,
    )


def step_rewards(groups: Iterable[Group]) -> pb.StepRewards | None:
    """Count, mean and sum of squared deviations of the rewards of ``groups``' rollouts.

    Sent with every request of a split step, so the server's batch scaling divides by the
    whole step's reward spread (the rule itself is the server's); None without rewards.
    """
    rewards = np.array(
        [r.reward for g in groups for r in g.rollouts if r.reward is not None], dtype=np.float64
    )
    if len(rewards) == 0:
        return None
    mean = float(rewards.mean())
    return pb.StepRewards(
        count=len(rewards),
        mean=mean,
        sum_squared_deviations=float(((rewards - mean) ** 2).sum()),
    )


def group_tokens(group: Group) -> int:
    """Prompt+response tokens of every rollout: the server's measure of a request's work."""
    prompt = len(group.prompt_ids)
    return sum(prompt + len(rollout.response_ids) for rollout in group.rollouts)


def content_step_id(groups: Iterable[Group]) -> str:
    """A step id that hashes the groups' content (ids, token ids, rewards).

    Trainer adapters use it, so a training step retried with the same rollouts resumes
    what the failed try finished (the client remembers failed steps by id).
    """
    digest = hashlib.blake2b(digest_size=12)
    for group in groups:
        digest.update(f"{group.group_id}\0{group.prompt_id}\0".encode())
        digest.update(np.asarray(group.prompt_ids, dtype=np.int64).tobytes())
        for rollout in group.rollouts:
            digest.update(b"\1" + np.asarray(rollout.response_ids, dtype=np.int64).tobytes())
            digest.update(repr(rollout.reward).encode())
    return "content-" + digest.hexdigest()
