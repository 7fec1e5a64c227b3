"""Typed configuration: the estimator parameters of one request.

Every parameter and every rule of the paper's reference code is a field here. The
defaults are the product's (measured on the SVEB dev split, see docs/design.md);
``reference()`` gives the reference code's exact rules. A params file (``statevalue
calibrate`` writes one, ``statevalue serve --params`` reads it) replaces some defaults;
requests may override any field; unknown names are rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NumberPattern = Literal["digits", "decimal"]
NumberBoundary = Literal["after_first_token", "at_first_token"]
TableStates = Literal["chain", "path"]
UnseenState = Literal["zero", "previous"]
EmaStart = Literal["first", "zero"]
Downsample = Literal["inclusive", "causal"]
KSchedule = Literal["floor_step", "linear"]
OwnNodes = Literal["prefix_length", "boundary"]
EndNode = Literal["last_token", "after_response"]
NodeAnchor = Literal["prompt_start", "response_start"]
Neighbours = Literal["top_k", "with_ties"]
ScaleMode = Literal["group", "batch", "none"]
GaeMode = Literal["segment", "token"]
Method = Literal["numca", "hista", "group_mean"]
CalibrationScope = Literal["request", "group"]
OwnWeightRule = Literal["fitted", "anchored", "none"]

METHODS: tuple[Method, ...] = ("numca", "hista", "group_mean")


# The length-adaptive defaults: fractions of the median length of a group's rewarded
# responses, chosen on the SVEB dev split (docs/design.md, "Reference mode and the
# defaults").
RELATIVE_NODE_SPACING = 0.08
RELATIVE_MERGE_DISTANCE = 0.05


class _Strict(BaseModel):
    # NaN passes no bound check and inf overflows the lengths derived from a fraction:
    # every parameter must be a finite number.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _fixed_when_alone(data: Any, fixed: str, relative: str) -> Any:
    """``data`` with ``relative`` = 0 when it sets ``fixed`` without ``relative``.

    An explicit fixed length means that length, not a cap on a relative one: it is never
    silently replaced by a length derived from the group.
    """
    if isinstance(data, dict) and fixed in data and relative not in data:
        return {**data, relative: 0.0}
    return data


class NumcaConfig(_Strict):
    """Numca: numbers in the response text mark milestones (docs/design.md, "Numca")."""

    number_pattern: NumberPattern = Field(
        "digits",
        description="'digits' = maximal runs of digits (reference); "
        "'decimal' = integers, decimals and fractions as one number each.",
    )
    merge_distance: int = Field(
        50,
        ge=0,
        description="Boundaries closer than this many tokens merge into the later one "
        "(reference); with relative_merge_distance, the most the group's distance can be. "
        "Setting merge_distance alone sets relative_merge_distance to 0.",
    )
    relative_merge_distance: float = Field(
        RELATIVE_MERGE_DISTANCE,
        ge=0.0,
        description="Merge distance as this fraction of the median length of the group's "
        "rewarded responses, rounded and capped at merge_distance, so that it fits short "
        "and long answers alike. 0 = the fixed merge_distance (reference).",
    )
    drop_last_number: bool = Field(
        True, description="Drop each response's last number (the answer)."
    )
    number_boundary: NumberBoundary = Field(
        "after_first_token",
        description="Where a number's state starts: 'after_first_token' = after the token "
        "holding its first character (reference); 'at_first_token' = at that token.",
    )
    table_states: TableStates = Field(
        "chain",
        description="States a rollout counts in: 'chain' = the empty set and every "
        "distinct-number prefix of its unmerged number chain (reference); 'path' = only the "
        "states its tokens are valued with after merging.",
    )
    unseen_state: UnseenState = Field(
        "zero",
        description="Value of a state the table never saw (only a query can reach one): "
        "'zero' (reference) or 'previous' = the value of the state before it.",
    )
    prior_count: float = Field(
        0.0,
        ge=0.0,
        description="Shrink each state's mean towards its parent state's value with this many "
        "pseudo-visits; 0 = reference (no shrinkage).",
    )

    @classmethod
    def reference(cls, **changes: object) -> NumcaConfig:
        """The reference code's exact rules, with ``changes`` applied."""
        return cls.model_validate({**_NUMCA_REFERENCE, **changes})

    @model_validator(mode="before")
    @classmethod
    def _explicit_merge_distance(cls, data: Any) -> Any:
        return _fixed_when_alone(data, "merge_distance", "relative_merge_distance")


_NUMCA_REFERENCE: dict[str, object] = {
    "number_pattern": "digits",
    "merge_distance": 50,
    "relative_merge_distance": 0.0,
    "drop_last_number": True,
    "number_boundary": "after_first_token",
    "table_states": "chain",
    "unseen_state": "zero",
    "prior_count": 0.0,
}


class HistaConfig(_Strict):
    """Hista: hidden-state nearest neighbours between rollouts (docs/design.md, "Hista")."""

    ema_alpha: float = Field(0.7, ge=0.0, lt=1.0, description="EMA decay along the sequence.")
    ema_start: EmaStart = Field(
        "first",
        description="EMA start: 'first' = e_0 is the first hidden state (reference); "
        "'zero' = e_0 = 0, the textbook bias-corrected EMA.",
    )
    stride: int = Field(5, ge=1, description="Keep every w-th smoothed hidden state.")
    downsample: Downsample = Field(
        "inclusive",
        description="'inclusive' = keep smoothed positions 0, w, 2w, ... and a node's prefix "
        "includes its own token (reference); 'causal' = keep w-1, 2w-1, ... strictly before "
        "the node's token.",
    )
    node_spacing: int = Field(
        50,
        ge=1,
        description="Tokens between nodes (delta, reference); with relative_node_spacing, the "
        "most the group's spacing can be. Setting node_spacing alone sets "
        "relative_node_spacing to 0.",
    )
    relative_node_spacing: float = Field(
        RELATIVE_NODE_SPACING,
        ge=0.0,
        description="Node spacing as this fraction of the median length of the group's "
        "rewarded responses, rounded and kept between 1 and node_spacing, so that short "
        "answers get nodes too. 0 = the fixed node_spacing (reference).",
    )
    node_anchor: NodeAnchor = Field(
        "prompt_start",
        description="Node grid anchored at the first prompt token (reference) or at the "
        "first response token.",
    )
    end_node: EndNode = Field(
        "last_token",
        description="'last_token' = the end node sits on the last response token, which is "
        "valued at the reward and gets advantage 0 (reference); 'after_response' = after it.",
    )
    d_min: float = Field(
        5.0,
        gt=0.0,
        description="Absolute clamp: distances are at least this (reference). Used when "
        "relative_d_min is 0; setting d_min alone sets relative_d_min to 0.",
    )
    relative_d_min: float = Field(
        0.025,
        ge=0.0,
        description="Clamp at this fraction of the group's distance scale (the median "
        "distance between its complete rewarded rollouts), so that it means the same on "
        "models with different hidden-state norms. 0 = the absolute d_min (reference).",
    )
    k_max: int = Field(66, ge=1, description="Neighbours at the first interior node.")
    k_min: int = Field(6, ge=1, description="Neighbours towards the last interior node.")
    k_schedule: KSchedule = Field(
        "floor_step",
        description="'floor_step' = k_i = k_max - floor((k_max - k_min) / n) * i for the i-th "
        "of n interior nodes (reference); 'linear' = a rounded ramp from k_max to k_min.",
    )
    neighbours: Neighbours = Field(
        "with_ties",
        description="'top_k' = exactly k nearest (reference), ties at the k-th broken by "
        "candidate order (rollout, then node); 'with_ties' = every candidate tied with the "
        "k-th counts too.",
    )
    own_nodes: OwnNodes = Field(
        "prefix_length",
        description="Which of the query rollout's own nodes are candidates: those whose "
        "prefix is no longer than the query's (reference) or those at or before its boundary.",
    )
    tau: float = Field(1.0, ge=0.0, description="Neighbour weight = 1 / distance**tau.")
    own_weight: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Factor on the weight of the query rollout's own prefix nodes, which all "
        "carry its own reward; 1 = reference, 0 = only other rollouts count.",
    )

    @classmethod
    def reference(cls, **changes: object) -> HistaConfig:
        """The reference code's exact rules, with ``changes`` applied."""
        return cls.model_validate({**_HISTA_REFERENCE, **changes})

    @model_validator(mode="before")
    @classmethod
    def _explicit_node_spacing(cls, data: Any) -> Any:
        return _fixed_when_alone(data, "node_spacing", "relative_node_spacing")

    @model_validator(mode="before")
    @classmethod
    def _one_clamp(cls, data: Any) -> Any:
        # An explicit d_min means the absolute clamp; it is never silently ignored.
        if isinstance(data, dict) and "d_min" in data:
            relative = data.get("relative_d_min")
            if relative is None:
                return {**data, "relative_d_min": 0.0}
            if isinstance(relative, int | float | str) and float(relative) > 0:
                raise ValueError("set d_min (absolute clamp) or relative_d_min, not both")
        return data

    @model_validator(mode="after")
    def _k_order(self) -> HistaConfig:
        if self.k_min > self.k_max:
            raise ValueError("k_min must not exceed k_max")
        return self


_HISTA_REFERENCE: dict[str, object] = {
    "ema_alpha": 0.7,
    "ema_start": "first",
    "stride": 5,
    "downsample": "inclusive",
    "node_spacing": 50,
    "relative_node_spacing": 0.0,
    "node_anchor": "prompt_start",
    "end_node": "last_token",
    "relative_d_min": 0.0,
    "k_max": 66,
    "k_min": 6,
    "k_schedule": "floor_step",
    "neighbours": "top_k",
    "own_nodes": "prefix_length",
    "tau": 1.0,
    "own_weight": 1.0,
}


class AdvantageConfig(_Strict):
    """Advantages from values (docs/design.md, "Advantages")."""

    gae: GaeMode = Field("segment", description="'segment' (reference) or 'token' GAE.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount (token GAE only).")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda.")
    scale: ScaleMode = Field(
        "group", description="Divide by reward std of the group / batch, or not."
    )
    scale_eps: float = Field(1e-4, ge=0.0, description="Added to the std before dividing.")


class SelfCalibrationConfig(_Strict):
    """Settings chosen from the request's own rewards (docs/design.md, "Self-calibration")."""

    enabled: bool = Field(
        False,
        description="Choose Hista's and Numca's settings per request by the "
        "leave-one-rollout-out error against the rollouts' own rewards; off = the settings "
        "as given (reference mode stays exact).",
    )
    scope: CalibrationScope = Field(
        "request",
        description="'request' = one choice for all groups of the request (a step); "
        "'group' = one per group.",
    )
    combine: bool = Field(
        True,
        description="Also try each method's best setting blended with the group mean or "
        "with the other method, the weight fitted by the same criterion.",
    )
    own_weight: OwnWeightRule = Field(
        "anchored",
        description="'fitted' = shrink each value towards the rollout's own reward by the "
        "fitted weight; 'anchored' = a weight for each quarter of the response, the reward's "
        "variance taken to fall linearly from the group's at the prompt to 0 at the end; "
        "'none' = values from the other rollouts only.",
    )


class EstimatorConfig(_Strict):
    """All estimator parameters of one request."""

    numca: NumcaConfig = NumcaConfig()
    hista: HistaConfig = HistaConfig()
    advantage: AdvantageConfig = AdvantageConfig()
    self_calibration: SelfCalibrationConfig = SelfCalibrationConfig()


# Hista's clamp is one choice made with two fields (an absolute d_min, or a relative one).
_CLAMP_FIELDS = frozenset({"d_min", "relative_d_min"})


def validation_message(exc: ValidationError) -> str:
    """``section.field: message; ...`` for every error of a failed validation."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
    )


def load_params(path: Path) -> EstimatorConfig:
    """A params file: JSON of an EstimatorConfig holding only the fields it changes.

    Unknown sections or fields are errors, as in a request. Raises ValueError naming the
    file and the field.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"params file {path}: {exc.strerror or exc}") from exc
    try:
        return EstimatorConfig.model_validate_json(text)
    except ValidationError as exc:
        raise ValueError(f"params file {path}: {validation_message(exc)}") from exc


def with_defaults(request: EstimatorConfig, defaults: EstimatorConfig) -> EstimatorConfig:
    """A request's parameters over a params file's, field by field.

    A field the request set wins; a field it left unset takes the ``defaults``' value if
    they set it, else the built-in default. Hista's clamp (``d_min``, ``relative_d_min``)
    is one choice: a request that sets either field replaces both.

    Raises:
        ValidationError: the combination is invalid (e.g. the file's ``k_max`` below the
            request's ``k_min``).
    """
    if not defaults.model_fields_set:
        return request
    merged: dict[str, dict[str, Any]] = {}
    for section in EstimatorConfig.model_fields:
        base = getattr(defaults, section).model_dump(exclude_unset=True)
        own = getattr(request, section).model_dump(exclude_unset=True)
        if section == "hista" and own.keys() & _CLAMP_FIELDS:
            base = {name: value for name, value in base.items() if name not in _CLAMP_FIELDS}
        merged[section] = {**base, **own}
    return EstimatorConfig.model_validate(merged)


def changed_fields(config: EstimatorConfig) -> dict[str, dict[str, Any]]:
    """The fields of ``config`` that differ from the built-in defaults, per section (JSON).

    Loading the result back gives the same values, except an unused absolute ``d_min``,
    which is left out: an explicit one would select the absolute clamp.
    """
    out: dict[str, dict[str, Any]] = {}
    built_in = EstimatorConfig()
    for section in EstimatorConfig.model_fields:
        ours = getattr(config, section).model_dump(mode="json")
        theirs = getattr(built_in, section).model_dump(mode="json")
        changed = {name: value for name, value in ours.items() if value != theirs[name]}
        if section == "hista" and config.hista.relative_d_min > 0:
            changed.pop("d_min", None)
        if changed:
            out[section] = changed
    return out
