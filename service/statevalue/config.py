"""Typed configuration: estimator parameters (per request) and server settings (per process).

Every estimator parameter of the paper's reference code is a field here, with the
reference default. Requests may override any of them; unknown names are rejected.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NumberPattern = Literal["digits", "decimal"]
ScaleMode = Literal["group", "batch", "none"]
GaeMode = Literal["segment", "token"]
Method = Literal["numca", "hista", "group_mean"]

METHODS: tuple[Method, ...] = ("numca", "hista", "group_mean")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumcaConfig(_Strict):
    """Numca: numbers in the response text mark milestones (DESIGN §3.2)."""

    number_pattern: NumberPattern = Field(
        "digits",
        description="'digits' = maximal runs of digits (reference); "
        "'decimal' = integers, decimals and fractions as one number each.",
    )
    merge_distance: int = Field(
        50, ge=0, description="Boundaries closer than this many tokens merge into the later one."
    )
    drop_last_number: bool = Field(
        True, description="Drop each response's last number (the answer)."
    )
    prior_count: float = Field(
        0.0,
        ge=0.0,
        description="Shrink each state's mean towards its parent state's value with this many "
        "pseudo-visits; 0 = reference (no shrinkage).",
    )

    @classmethod
    def reference(cls, **changes: object) -> NumcaConfig:
        """The paper's reference rule (no shrinkage), with ``changes`` applied."""
        return cls.model_validate({"prior_count": 0.0, **changes})


class HistaConfig(_Strict):
    """Hista: hidden-state nearest neighbours between rollouts of a group (DESIGN §3.3)."""

    ema_alpha: float = Field(0.7, ge=0.0, lt=1.0, description="EMA decay along the sequence.")
    stride: int = Field(5, ge=1, description="Keep every w-th smoothed hidden state.")
    node_spacing: int = Field(50, ge=1, description="Response tokens between nodes (delta).")
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
    k_min: int = Field(6, ge=1, description="Neighbours at the last interior node.")
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
        """The paper's reference rule (absolute d_min, own nodes at full weight), changed."""
        return cls.model_validate({"relative_d_min": 0.0, "own_weight": 1.0, **changes})

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


class AdvantageConfig(_Strict):
    """Advantages from values (DESIGN §3.4-3.5)."""

    gae: GaeMode = Field("segment", description="'segment' (reference) or 'token' GAE.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount (token GAE only).")
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda.")
    scale: ScaleMode = Field(
        "group", description="Divide by reward std of the group / batch, or not."
    )
    scale_eps: float = Field(1e-4, ge=0.0, description="Added to the std before dividing.")


class EstimatorConfig(_Strict):
    """All estimator parameters of one request."""

    numca: NumcaConfig = NumcaConfig()
    hista: HistaConfig = HistaConfig()
    advantage: AdvantageConfig = AdvantageConfig()
