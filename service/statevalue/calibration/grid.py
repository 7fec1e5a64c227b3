"""The candidate settings of a calibration run and their values at the sampled states."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from statevalue.calibration.monte_carlo import State
from statevalue.config import (
    EstimatorConfig,
    HistaConfig,
    Method,
    NumcaConfig,
    changed_fields,
)
from statevalue.engine import Engine, PreparedGroup, PreparedRequest

# The grid: each value on top of the built-in defaults, plus the defaults themselves and
# the reference settings.
NUMCA_PATTERNS = ("digits", "decimal")
NUMCA_MERGE_DISTANCES = (0, 10, 25, 50)
# Fractions of the group's median response length (capped at the reference's 50 tokens):
# settings that carry over to answers of another length.
NUMCA_RELATIVE_MERGE_DISTANCES = (0.025, 0.05, 0.1)
HISTA_NODE_SPACINGS = (5, 10, 20, 50)
HISTA_RELATIVE_NODE_SPACINGS = (0.05, 0.08, 0.125, 0.2)
HISTA_RELATIVE_D_MINS = (0.01, 0.025, 0.05, 0.1)

GROUP_MEAN = "group mean"
MIX = "½ own reward + ½ group mean"
# Rows of self-calibration (docs/design.md, "Self-calibration"): compared with the targets
# like every other row, never recommended (a params file holds Numca and Hista settings).
SELF_CALIBRATED = "self-calibrated"


@dataclass(frozen=True)
class Candidate:
    """One method under one setting: a row of the table."""

    label: str
    method: Method
    config: EstimatorConfig


def _label(method: str, config: EstimatorConfig) -> str:
    fields = changed_fields(config).get(method, {})
    name = ", ".join(f"{k}={v}" for k, v in fields.items()) or "default"
    section = getattr(config, method)
    if section == type(section).reference():
        name += " (reference)"
    return f"{method} {name}"


def candidates() -> list[Candidate]:
    """Group mean, then Numca and Hista: the defaults, the reference settings, the grid;
    last, each method self-calibrated per group.

    Duplicates are dropped, so a grid point equal to the defaults appears once, as the
    defaults (which then win ties: they come first).
    """
    # Length settings: relative fractions first, then fixed lengths.
    merges = (
        [{"relative_merge_distance": f} for f in NUMCA_RELATIVE_MERGE_DISTANCES],
        [{"merge_distance": m} for m in NUMCA_MERGE_DISTANCES],
    )
    spacings = (
        [{"relative_node_spacing": f} for f in HISTA_RELATIVE_NODE_SPACINGS],
        [{"node_spacing": n} for n in HISTA_NODE_SPACINGS],
    )
    numca = [NumcaConfig(), NumcaConfig.reference()] + [
        NumcaConfig(number_pattern=p, **length)
        for kind in merges
        for p in NUMCA_PATTERNS
        for length in kind
    ]
    hista = [HistaConfig(), HistaConfig.reference()] + [
        HistaConfig(relative_d_min=r, **length)
        for kind in spacings
        for length in kind
        for r in HISTA_RELATIVE_D_MINS
    ]
    out = [Candidate(GROUP_MEAN, "group_mean", EstimatorConfig())]
    for method, section in (("numca", numca), ("hista", hista)):
        for one in dict.fromkeys(section):
            config = EstimatorConfig(**{method: one})
            out.append(Candidate(_label(method, config), method, config))  # type: ignore[arg-type]
    calibrating = EstimatorConfig.model_validate(
        {"self_calibration": {"enabled": True, "scope": "group"}}
    )
    for method in ("numca", "hista"):
        out.append(Candidate(f"{method} {SELF_CALIBRATED} per group", method, calibrating))  # type: ignore[arg-type]
    return out


def group_estimates(
    engine: Engine, group: PreparedGroup, states: Sequence[State], rows: Sequence[Candidate]
) -> dict[str, np.ndarray]:
    """Per row label, and for the ½ mix: the value at each of ``states`` of one group.

    The hidden states are computed once; every row only re-runs its estimator.
    """
    hidden: list[torch.Tensor] | None = None
    if any(row.method == "hista" for row in rows):
        request = PreparedRequest(groups=[group], methods=("hista",), config=EstimatorConfig())
        hidden = engine.backend.hidden_states(request.sequences(), request.prefix_lengths())
    out: dict[str, np.ndarray] = {}
    for row in rows:
        request = PreparedRequest(groups=[group], methods=(row.method,), config=row.config)
        rollouts = engine.compute(request, hidden).groups[0].rollouts
        out[row.label] = np.array(
            [float(rollouts[s.response].values[row.method][s.t]) for s in states]
        )
    own = np.array([float(group.rewards[s.response]) for s in states])
    out[MIX] = 0.5 * own + 0.5 * out[GROUP_MEAN]
    return out
