"""The value engine: checks requests, runs the model when needed, applies the estimators.

Work is split in three steps so a scheduler can merge the forward passes of many
requests: ``prepare`` (checks + tokenisation), the backend's ``hidden_states`` over
``PreparedRequest.sequences``, and ``compute`` (estimators + advantages).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from statevalue.backends.base import ModelBackend, ModelIdentity
from statevalue.config import (
    METHODS,
    EstimatorConfig,
    Method,
    NumcaConfig,
    validation_message,
    with_defaults,
)
from statevalue.estimators.advantages import (
    RewardStatistics,
    scale_advantages,
    segment_gae,
    token_gae,
)
from statevalue.estimators.base import ValueEstimate
from statevalue.estimators.group_mean import group_mean_values
from statevalue.estimators.hista import (
    HistaNode,
    hista_values,
    hista_values_explained,
    hista_values_from_states,
)
from statevalue.estimators.numca import (
    NumcaPath,
    NumcaTable,
    add_to_table,
    group_merge_distance,
    numca_path,
    read_numca_values,
    table_rows,
)
from statevalue.estimators.self_calibration import (
    GroupCandidates,
    SelfCalibration,
    hista_candidates,
    numca_candidates,
    self_calibrate,
    target_group,
)
from statevalue.numca_store import (
    Contribution,
    ContributionConflict,
    InMemoryNumcaStore,
    NumcaStore,
    TableUpdate,
    encode_state,
)
from statevalue.schema import (
    EstimateRequest,
    EstimateResult,
    GroupInput,
    GroupResult,
    InvalidRequest,
    RolloutExplanation,
    RolloutResult,
)
from statevalue.tokenization import TokenText
from statevalue_client.arrays import unpack_vectors
from statevalue_client.states import HISTA_FIELDS, StatesFormat, representation_counts

# Rewards beyond this make the reward std, GAE sums or float32 answers overflow; no real
# reward comes near it.
MAX_ABS_REWARD = 1e15


@dataclass
class PreparedGroup:
    """A checked group as token ids, ready for the model and the estimators."""

    group_id: str
    prompt_id: str | None
    prompt_ids: np.ndarray
    responses: list[np.ndarray]
    rewards: np.ndarray
    rewarded: np.ndarray
    token_rewards: list[np.ndarray | None]
    # Identifies the group's Numca contribution across retries ("" = none) and the field
    # it came from, to name in an error.
    numca_key: str = ""
    numca_key_field: str = "group_id"
    # Each rollout's Hista representation as the trainer sent it, prompt part included.
    hista_states: list[np.ndarray] | None = None

    def content_digest(self) -> str:
        """A hash of the tokens and rewards: a resent group has the same one."""
        digest = hashlib.sha256(self.prompt_ids.astype("<i4").tobytes())
        for response, reward, rewarded in zip(
            self.responses, self.rewards, self.rewarded, strict=True
        ):
            digest.update(len(response).to_bytes(4, "little"))
            digest.update(response.astype("<i4").tobytes())
            digest.update(repr(float(reward) if rewarded else None).encode())
        return digest.hexdigest()[:32]


@dataclass
class PreparedRequest:
    groups: list[PreparedGroup]
    methods: tuple[Method, ...]
    config: EstimatorConfig
    explain: bool = False
    step_rewards: RewardStatistics | None = None

    @property
    def needs_hidden_states(self) -> bool:
        """Hista is asked for and its representations were not sent."""
        return "hista" in self.methods and any(g.hista_states is None for g in self.groups)

    def sequences(self) -> list[np.ndarray]:
        """Prompt+response ids of every rollout, in group order, for the forward pass."""
        return [
            np.concatenate([group.prompt_ids, response])
            for group in self.groups
            for response in group.responses
        ]

    def prefix_lengths(self) -> list[int]:
        """Prompt length of every sequence of ``sequences()``: the part its group shares."""
        return [len(group.prompt_ids) for group in self.groups for _ in group.responses]

    @property
    def num_tokens(self) -> int:
        return sum(len(group.prompt_ids) + len(r) for group in self.groups for r in group.responses)


def check_methods(methods: Sequence[str]) -> tuple[Method, ...]:
    """Validated, de-duplicated methods in the order given."""
    if not methods:
        raise InvalidRequest("methods", f"choose at least one of {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidRequest(
            "methods", f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}"
        )
    return tuple(dict.fromkeys(methods))  # type: ignore[arg-type]


class Engine:
    """Per-token values and advantages for groups of rollouts on one policy model.

    ``defaults`` (a params file's settings) fill the estimator parameters a request leaves
    unset (:func:`statevalue.config.with_defaults`). ``layer`` is the hidden-state layer
    the backend serves, which representations sent by a trainer must have been made from.
    """

    def __init__(
        self,
        backend: ModelBackend,
        *,
        numca_store: NumcaStore | None = None,
        max_groups: int = 1024,
        max_tokens: int = 65_536,
        defaults: EstimatorConfig | None = None,
        layer: int = -1,
    ) -> None:
        self.backend = backend
        self.layer = layer
        self.defaults = defaults or EstimatorConfig()
        self.numca_store: NumcaStore = numca_store or InMemoryNumcaStore()
        self.max_groups = max_groups
        self.max_tokens = max_tokens
        self.token_text = TokenText(backend.tokenizer, backend.vocab_size)

    @property
    def model(self) -> ModelIdentity:
        return self.backend.identity

    def estimate(self, request: EstimateRequest) -> EstimateResult:
        """Prepare, run the model if a method needs it, and compute: the one-call path."""
        prepared = self.prepare(request)
        hidden = None
        start = time.perf_counter()
        if prepared.needs_hidden_states:
            hidden = self.backend.hidden_states(prepared.sequences(), prepared.prefix_lengths())
        forward_seconds = time.perf_counter() - start
        result = self.compute(prepared, hidden)
        result.forward_seconds = forward_seconds
        return result

    # -- step 1: checks and tokenisation -------------------------------------------------

    def prepare(self, request: EstimateRequest) -> PreparedRequest:
        """Check every field and tokenise text input; raises InvalidRequest naming the field."""
        methods = check_methods(request.methods)
        if not request.groups:
            raise InvalidRequest("groups", "the request has no groups")
        if len(request.groups) > self.max_groups:
            raise InvalidRequest(
                "groups",
                f"at most {self.max_groups} groups per request; split it into several requests "
                "(the Python client's estimate() does)",
            )
        _check_unique(request.groups)
        try:
            config = with_defaults(request.config, self.defaults)
        except ValidationError as exc:
            raise InvalidRequest(
                "params", f"with the server's default params: {validation_message(exc)}"
            ) from exc
        groups = [self._prepare_group(g, f"groups[{i}]") for i, g in enumerate(request.groups)]
        if "hista" in methods:
            self._attach_states(request, groups, config)
        prepared = PreparedRequest(
            groups=groups,
            methods=methods,
            config=config,
            explain=request.explain,
            step_rewards=request.step_rewards,
        )
        if prepared.num_tokens > self.max_tokens:
            raise InvalidRequest(
                "groups",
                f"the request has {prepared.num_tokens} prompt+response tokens, over the "
                f"per-request limit of {self.max_tokens}; split it into several requests "
                "(the Python client's estimate() does)",
            )
        return prepared

    def _prepare_group(self, group: GroupInput, where: str) -> PreparedGroup:
        if not group.rollouts:
            raise InvalidRequest(f"{where}.rollouts", "empty group: send at least one rollout")
        prompt_ids, text_mode = self._prompt_ids(group, where)
        responses: list[np.ndarray] = []
        rewards = np.zeros(len(group.rollouts), dtype=np.float64)
        rewarded = np.zeros(len(group.rollouts), dtype=bool)
        token_rewards: list[np.ndarray | None] = []
        for j, rollout in enumerate(group.rollouts):
            at = f"{where}.rollouts[{j}]"
            if rollout.response_ids is not None and rollout.response_text is not None:
                raise InvalidRequest(at, "give response_ids or response_text, not both")
            if text_mode:
                if rollout.response_text is None:
                    raise InvalidRequest(f"{at}.response_text", "required when the prompt is text")
                response = self.token_text.encode_text(rollout.response_text)
            else:
                if rollout.response_ids is None:
                    field = f"{at}.response_ids"
                    if rollout.response_text is not None:
                        raise InvalidRequest(
                            field, "text given where ids are required: the prompt is ids"
                        )
                    raise InvalidRequest(field, "required")
                response = self._check_ids(rollout.response_ids, f"{at}.response_ids")
            if len(prompt_ids) + len(response) > self.backend.max_length:
                raise InvalidRequest(
                    f"{at}.response_ids",
                    f"prompt+response is {len(prompt_ids) + len(response)} tokens, longer than "
                    f"the model's context of {self.backend.max_length}",
                )
            if rollout.reward is not None:
                if not math.isfinite(rollout.reward):
                    raise InvalidRequest(f"{at}.reward", f"must be finite, not {rollout.reward}")
                if abs(rollout.reward) > MAX_ABS_REWARD:
                    raise InvalidRequest(
                        f"{at}.reward", f"must be within ±{MAX_ABS_REWARD:g}, not {rollout.reward}"
                    )
                rewards[j] = rollout.reward
                rewarded[j] = True
            per_token = rollout.token_rewards
            if per_token is not None:
                per_token = np.asarray(per_token, dtype=np.float64)
                if rollout.reward is None:
                    raise InvalidRequest(f"{at}.reward", "required when token_rewards are given")
                if per_token.shape != (len(response),):
                    raise InvalidRequest(
                        f"{at}.token_rewards",
                        f"needs one per response token ({len(response)}), got {per_token.size}",
                    )
                if not np.isfinite(per_token).all():
                    raise InvalidRequest(f"{at}.token_rewards", "must all be finite")
                if per_token.size and np.abs(per_token).max() > MAX_ABS_REWARD:
                    raise InvalidRequest(
                        f"{at}.token_rewards", f"must all be within ±{MAX_ABS_REWARD:g}"
                    )
            responses.append(response)
            token_rewards.append(per_token)
        if not rewarded.any():
            raise InvalidRequest(f"{where}.rollouts", "needs at least one rollout with a reward")
        return PreparedGroup(
            group_id=group.group_id or str(where),
            prompt_id=group.prompt_id or None,
            prompt_ids=prompt_ids,
            responses=responses,
            rewards=rewards,
            rewarded=rewarded,
            token_rewards=token_rewards,
            numca_key=group.idempotency_key or group.group_id,
            numca_key_field="idempotency_key" if group.idempotency_key else "group_id",
        )

    def _attach_states(
        self, request: EstimateRequest, groups: list[PreparedGroup], config: EstimatorConfig
    ) -> None:
        """Decode and check the trainer's Hista representations (docs/design.md, "Hista
        states from the trainer") into ``groups``; refuse a Hista request without them on
        a server with no model."""
        states = request.hista_states
        if states is None:
            if self.backend.kind == "none":
                raise InvalidRequest(
                    "hista_states",
                    "this server runs no model (backend none): a hista request must carry "
                    "the trainer's representations (statevalue_client.states), or ask for "
                    "numca and group_mean only",
                )
            return
        for name in HISTA_FIELDS:
            sent, setting = getattr(states, name), getattr(config.hista, name)
            if sent != setting:
                raise InvalidRequest(
                    f"hista_states.{name}",
                    f"the representations were made with {name} {sent!r}, but the request's "
                    f"Hista setting is {setting!r}; they must be equal",
                )
        if states.layer != self.layer:
            raise InvalidRequest(
                "hista_states.layer",
                f"the representations come from layer {states.layer}, this server's Hista "
                f"layer is {self.layer}",
            )
        hidden_size = int(getattr(self.backend, "hidden_size", 0))
        if not states.projection and hidden_size and states.dimension != hidden_size:
            raise InvalidRequest(
                "hista_states.dimension",
                f"unprojected representations have the model's hidden size {hidden_size}, "
                f"not {states.dimension}",
            )
        for g, (given, group) in enumerate(zip(request.groups, groups, strict=True)):
            group.hista_states = _group_states(given, group, states, f"groups[{g}]")

    def _prompt_ids(self, group: GroupInput, where: str) -> tuple[np.ndarray, bool]:
        given = [
            name
            for name, value in (
                ("prompt_ids", group.prompt_ids),
                ("prompt_text", group.prompt_text),
                ("messages", group.messages),
            )
            if value is not None
        ]
        if len(given) != 1:
            raise InvalidRequest(
                f"{where}.prompt_ids",
                "give exactly one of prompt_ids, prompt_text, messages"
                + (f" (got {', '.join(given)})" if given else ""),
            )
        if group.prompt_ids is not None:
            ids = self._check_ids(group.prompt_ids, f"{where}.prompt_ids")
            text_mode = False
        elif group.prompt_text is not None:
            ids = self.token_text.encode_text(group.prompt_text)
            text_mode = True
        else:
            try:
                ids = self.token_text.encode_chat(group.messages or [])
            except (ValueError, TypeError, KeyError) as exc:
                raise InvalidRequest(f"{where}.messages", str(exc)) from exc
            text_mode = True
        if len(ids) == 0:
            raise InvalidRequest(f"{where}.prompt_ids", "the prompt is empty")
        return ids, text_mode

    def _check_ids(self, ids: np.ndarray, field: str) -> np.ndarray:
        array = np.asarray(ids)
        if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
            raise InvalidRequest(field, "must be a flat list of integer token ids")
        array = array.astype(np.int64, copy=False)
        if array.size and (array.min() < 0 or array.max() >= self.backend.vocab_size):
            bad = int(array[(array < 0) | (array >= self.backend.vocab_size)][0])
            raise InvalidRequest(
                field, f"token id {bad} is outside the vocabulary [0, {self.backend.vocab_size})"
            )
        return array.astype(np.int32)

    # -- step 3: estimators and advantages -----------------------------------------------

    def compute(
        self, prepared: PreparedRequest, hidden: Sequence[torch.Tensor] | None
    ) -> EstimateResult:
        """Values, advantages and boundaries for every rollout and method."""
        start = time.perf_counter()
        config = prepared.config
        if prepared.needs_hidden_states and hidden is None:
            raise ValueError("hista needs the hidden states of prepared.sequences()")
        decoded = self._decoded(prepared) if self._decoding_needed(prepared) else []
        numca, numca_paths = (
            self._numca(prepared, decoded) if "numca" in prepared.methods else ([], [])
        )
        calibrated = self._self_calibrated(prepared, hidden, decoded)
        if calibrated:
            # The explanation's states and neighbours would be those of the configured
            # settings, not of the answer: only token texts are explained.
            numca_paths = []
        offset = 0
        per_group: list[dict[str, ValueEstimate]] = []
        hista_nodes: list[list[list[HistaNode]]] = []
        for g, group in enumerate(prepared.groups):
            lengths = [len(r) for r in group.responses]
            estimates: dict[str, ValueEstimate] = {}
            for method in prepared.methods:
                if calibrated and method in calibrated[g]:
                    estimates[method] = calibrated[g][method][0]
                elif method == "group_mean":
                    estimates[method] = group_mean_values(lengths, group.rewards, group.rewarded)
                elif method == "numca":
                    estimates[method] = numca[g]
                elif group.hista_states is not None:
                    estimates[method], nodes = hista_values_from_states(
                        [torch.from_numpy(s) for s in group.hista_states],
                        len(group.prompt_ids),
                        lengths,
                        group.rewards,
                        group.rewarded,
                        config.hista,
                        explain=prepared.explain,
                    )
                    if nodes is not None:
                        hista_nodes.append(nodes)
                else:
                    assert hidden is not None
                    inputs = (
                        hidden[offset : offset + len(lengths)],
                        len(group.prompt_ids),
                        lengths,
                        group.rewards,
                        group.rewarded,
                        config.hista,
                    )
                    if prepared.explain:
                        estimates[method], nodes = hista_values_explained(*inputs)
                        hista_nodes.append(nodes)
                    else:
                        estimates[method] = hista_values(*inputs)
            offset += len(lengths)
            per_group.append(estimates)
        groups = self._advantages(prepared, per_group)
        for group_result, chosen in zip(groups, calibrated, strict=False):
            group_result.self_calibration = {m: report for m, (_, report) in chosen.items()}
        _check_finite(groups, config)
        if prepared.explain:
            self._explain(prepared, groups, numca_paths, hista_nodes)
        result = EstimateResult(model=self.model, groups=groups)
        result.estimator_seconds = time.perf_counter() - start
        return result

    def _explain(
        self,
        prepared: PreparedRequest,
        groups: list[GroupResult],
        numca_paths: list[list[NumcaPath]],
        hista_nodes: list[list[list[HistaNode]]],
    ) -> None:
        """Attach each rollout's explanation: token texts, Numca states, Hista neighbours."""
        for g, (group, result) in enumerate(zip(prepared.groups, groups, strict=True)):
            for j, (response, rollout) in enumerate(
                zip(group.responses, result.rollouts, strict=True)
            ):
                explanation = RolloutExplanation(tokens=self.token_text.token_texts(response))
                if numca_paths:
                    path = numca_paths[g][j]
                    explanation.numca_states = [_sorted_numbers(s) for s in path.states]
                    if path.final_state is not None:
                        explanation.numca_final_state = _sorted_numbers(path.final_state)
                if hista_nodes:
                    explanation.hista_nodes = hista_nodes[g][j]
                rollout.explanation = explanation

    @staticmethod
    def _decoding_needed(prepared: PreparedRequest) -> bool:
        calibrating = prepared.config.self_calibration.enabled and "hista" in prepared.methods
        return "numca" in prepared.methods or calibrating

    def _decoded(self, prepared: PreparedRequest) -> list[list[tuple[str, np.ndarray]]]:
        """Each response's text and its tokens' character end offsets, per group."""
        return [
            [self.token_text.decode_with_offsets(response) for response in group.responses]
            for group in prepared.groups
        ]

    def _self_calibrated(
        self,
        prepared: PreparedRequest,
        hidden: Sequence[torch.Tensor] | None,
        decoded: list[list[tuple[str, np.ndarray]]],
    ) -> list[dict[str, tuple[ValueEstimate, SelfCalibration]]]:
        """Per group, the self-calibrated values and choice of hista and numca (empty when
        self-calibration is off). Re-uses the forward pass and the decoded texts."""
        config = prepared.config
        methods = [m for m in prepared.methods if m in ("hista", "numca")]
        if not config.self_calibration.enabled or not methods:
            return []
        candidates = []
        offset = 0
        for group, texts in zip(prepared.groups, decoded, strict=True):
            lengths = [len(r) for r in group.responses]
            target = target_group(lengths, group.rewards, group.rewarded)
            hista = []
            if "hista" in methods:
                assert hidden is not None
                group_hidden = hidden[offset : offset + len(lengths)]
                hista = hista_candidates(group_hidden, len(group.prompt_ids), target, config.hista)
            offset += len(lengths)
            numca = numca_candidates(
                [t for t, _ in texts], [e for _, e in texts], target, config.numca
            )
            candidates.append(GroupCandidates(target, hista, numca))
        if config.self_calibration.scope == "request":
            return self_calibrate(candidates, methods, config.self_calibration)
        return [self_calibrate([c], methods, config.self_calibration)[0] for c in candidates]

    def _numca(
        self, prepared: PreparedRequest, decoded: list[list[tuple[str, np.ndarray]]]
    ) -> tuple[list[ValueEstimate], list[list[NumcaPath]]]:
        """Numca values of every group, each table holding the whole request first, and
        the paths (states) of every rollout.

        Groups that share a ``prompt_id`` share the stored table of that prompt: all of
        them are added (each key once, ever) before any is read, as the reference adds a
        whole batch, in one atomic store call. A group without one gets a table of its own.
        """
        numca = prepared.config.numca
        paths: list[list[NumcaPath]] = []
        for group, texts in zip(prepared.groups, decoded, strict=True):
            lengths = [len(r) for r in group.responses]
            group_numca = group_merge_distance(lengths, group.rewarded, numca)
            paths.append([numca_path(text, ends, group_numca) for text, ends in texts])

        def read(table: NumcaTable, g: int) -> ValueEstimate:
            lengths = [len(r) for r in prepared.groups[g].responses]
            return read_numca_values(
                paths[g], lengths, table, numca.unseen_state, numca.prior_count
            )

        results: dict[int, ValueEstimate] = {}
        shared: dict[str, list[int]] = {}
        for g, group in enumerate(prepared.groups):
            if group.prompt_id is None:
                table = NumcaTable()
                add_to_table(table, paths[g], group.rewards, group.rewarded, numca.table_states)
                results[g] = read(table, g)
            else:
                shared.setdefault(group.prompt_id, []).append(g)
        if not shared:
            return [results[g] for g in range(len(prepared.groups))], paths
        updates, wanted = [], []
        for prompt_id, members in shared.items():
            contributions = []
            for g in members:
                group = prepared.groups[g]
                rows = table_rows(paths[g], group.rewards, group.rewarded, numca.table_states)
                contributions.append(
                    Contribution(
                        group.numca_key,
                        group.content_digest(),
                        tuple((tuple(map(encode_state, s)), r) for s, r in rows),
                    )
                )
            states = list(dict.fromkeys(s for g in members for p in paths[g] for s in p.read))
            wanted.append(states)
            updates.append(
                TableUpdate(
                    self._table_key(prompt_id, numca),
                    tuple(contributions),
                    tuple(map(encode_state, states)),
                )
            )
        try:
            replies = self.numca_store.add_and_read(updates)
        except ContributionConflict as exc:
            raise _conflict(prepared, shared, updates, exc) from exc
        for members, states, reply in zip(shared.values(), wanted, replies, strict=True):
            table = NumcaTable.from_stats(
                {s: reply[encode_state(s)] for s in states if encode_state(s) in reply}
            )
            for g in members:
                results[g] = read(table, g)
        return [results[g] for g in range(len(prepared.groups))], paths

    @staticmethod
    def _table_key(prompt_id: str, numca: NumcaConfig) -> str:
        """The prompt's table under rules that decide states and counts (a content hash):
        rules that give different states or counts never share a table."""
        rules: list[object] = [
            prompt_id,
            numca.number_pattern,
            numca.merge_distance,
            numca.drop_last_number,
            numca.number_boundary,
            numca.table_states,
        ]
        if numca.relative_merge_distance:
            # Appended only when set, so the tables of a fixed distance keep their keys.
            rules.append(numca.relative_merge_distance)
        return hashlib.sha256(json.dumps(rules).encode()).hexdigest()[:32]

    def _advantages(
        self, prepared: PreparedRequest, per_group: list[dict[str, ValueEstimate]]
    ) -> list[GroupResult]:
        adv_config = prepared.config.advantage
        rewards = np.concatenate([g.rewards for g in prepared.groups])
        rewarded = np.concatenate([g.rewarded for g in prepared.groups])
        group_index = np.concatenate(
            [np.full(len(g.responses), i) for i, g in enumerate(prepared.groups)]
        )
        advantages: dict[str, list[np.ndarray]] = {}
        for method in prepared.methods:
            raw = []
            for group, estimates in zip(prepared.groups, per_group, strict=True):
                estimate = estimates[method]
                for j, values in enumerate(estimate.values):
                    terminal = float(group.rewards[j]) if group.rewarded[j] else None
                    if adv_config.gae == "segment":
                        final = None if estimate.final_values is None else estimate.final_values[j]
                        raw.append(
                            segment_gae(
                                values,
                                estimate.boundaries[j],
                                terminal,
                                adv_config.lam,
                                group.token_rewards[j],
                                final,
                            )
                        )
                    else:
                        raw.append(
                            token_gae(
                                values,
                                terminal,
                                adv_config.gamma,
                                adv_config.lam,
                                group.token_rewards[j],
                            )
                        )
            advantages[method] = scale_advantages(
                raw,
                rewards,
                rewarded,
                group_index,
                adv_config.scale,
                adv_config.scale_eps,
                prepared.step_rewards,
            )
        results = []
        flat = 0
        for group, estimates in zip(prepared.groups, per_group, strict=True):
            rollouts = []
            for j in range(len(group.responses)):
                rollouts.append(
                    RolloutResult(
                        values={m: estimates[m].values[j] for m in prepared.methods},
                        advantages={m: advantages[m][flat + j] for m in prepared.methods},
                        boundaries={m: estimates[m].boundaries[j] for m in prepared.methods},
                    )
                )
            flat += len(group.responses)
            results.append(GroupResult(group_id=group.group_id, rollouts=rollouts))
        return results


def _group_states(
    given: GroupInput, group: PreparedGroup, states: StatesFormat, where: str
) -> list[np.ndarray]:
    """Each rollout's representation (prompt part + its own) from the packed bytes, with
    the counts its token lengths call for."""

    def decode(data: bytes | None, count: int, expected: int, field: str) -> np.ndarray:
        if count != expected:
            raise InvalidRequest(
                field,
                f"{count} representation vectors, but its tokens call for {expected} "
                f"(stride {states.stride}, downsample {states.downsample!r})",
            )
        try:
            return unpack_vectors(data or b"", states.dtype, count, states.dimension, field)
        except ValueError as exc:
            raise InvalidRequest(field, str(exc).split(": ", 1)[1]) from exc

    prompt_len = len(group.prompt_ids)
    counts = [
        representation_counts(prompt_len, len(r), states.stride, states.downsample)
        for r in group.responses
    ]
    prompt = decode(
        given.prompt_hista_states,
        given.prompt_num_hista_states,
        counts[0][0],
        f"{where}.prompt_hista_states",
    )
    out = []
    for j, (rollout, (_, own)) in enumerate(zip(given.rollouts, counts, strict=True)):
        vectors = decode(
            rollout.hista_states,
            rollout.num_hista_states,
            own,
            f"{where}.rollouts[{j}].hista_states",
        )
        out.append(np.concatenate([prompt, vectors]))
    return out


def _sorted_numbers(state: frozenset[str]) -> list[str]:
    """A Numca state's numbers in numeric order (a fraction by its numerator)."""
    return sorted(state, key=lambda number: (float(number.split("/")[0]), number))


def _check_unique(groups: Sequence[GroupInput]) -> None:
    """Group ids and idempotency keys name one group each within a request."""
    for name in ("group_id", "idempotency_key"):
        first: dict[str, int] = {}
        for i, group in enumerate(groups):
            value = getattr(group, name)
            if value and value in first:
                raise InvalidRequest(
                    f"groups[{i}].{name}",
                    f"{value!r} is also groups[{first[value]}].{name}; each group of a "
                    "request needs its own",
                )
            first.setdefault(value, i)


def _conflict(
    prepared: PreparedRequest,
    shared: dict[str, list[int]],
    updates: list[TableUpdate],
    exc: ContributionConflict,
) -> InvalidRequest:
    """The error naming the group whose key was counted before with other content."""
    table = [u.table for u in updates].index(exc.table)
    prompt_id, members = list(shared.items())[table]
    g = next(g for g in members if prepared.groups[g].numca_key == exc.key)
    name = prepared.groups[g].numca_key_field
    return InvalidRequest(
        f"groups[{g}].{name}",
        f"{exc.key!r} of prompt_id {prompt_id!r} was already counted in Numca with other "
        f"rollouts or rewards; a retry must resend the same group, and a new group of the "
        f"prompt needs a {name} of its own (a unique id per step)",
    )


def _check_finite(groups: list[GroupResult], config: EstimatorConfig) -> None:
    """Refuse to answer with a number that is not finite as the float32 the wire carries.

    Bounded rewards keep values finite, except Hista's, whose neighbour weights
    ``1 / distance**tau`` overflow for a large ``tau``, so that is the field named; a
    scale_eps too small for a group whose rewards are (nearly) equal can still blow the
    scaled advantages up, so that is the field named for advantages.
    """
    for i, group in enumerate(groups):
        for j, rollout in enumerate(group.rollouts):
            for method, values in rollout.values.items():
                at = f"groups[{i}].rollouts[{j}]"
                if not np.isfinite(np.asarray(values, dtype=np.float32)).all():
                    if method == "hista":
                        raise InvalidRequest(
                            "params.hista.tau",
                            f"the hista values of {at} are not finite: the neighbour weights "
                            f"1 / distance**tau overflow at tau = {config.hista.tau:g}",
                        )
                    raise InvalidRequest(
                        f"{at}.reward", f"the {method} values are not finite for these rewards"
                    )
                if not np.isfinite(np.asarray(rollout.advantages[method], dtype=np.float32)).all():
                    field = (
                        f"{at}.reward"
                        if config.advantage.scale == "none"
                        else "params.advantage.scale_eps"
                    )
                    raise InvalidRequest(
                        field,
                        f"the {method} advantages of {at} are not finite: the group's rewards "
                        "are too close together for this scale_eps",
                    )
