"""The table of a calibration run: every candidate's error against the Monte Carlo
targets, and the recommendation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from statevalue.calibration.grid import GROUP_MEAN, MIX, SELF_CALIBRATED
from statevalue.calibration.statistics import beats, clustered_mean, paired_difference


@dataclass(frozen=True)
class Row:
    """A row of the table: MAE ± SE, ratio to the group mean's, and the paired differences
    of the absolute errors against the group mean and against the ½ mix (mean, SE)."""

    label: str
    method: str
    mae: float
    se: float
    ratio: float
    vs_group_mean: tuple[float, float]
    vs_mix: tuple[float, float]


def score(
    estimates: dict[str, np.ndarray],
    targets: np.ndarray,
    clusters: Sequence[str],
    methods: dict[str, str],
) -> list[Row]:
    """One :class:`Row` per estimate (label -> value at every state).

    ``methods`` maps a label to its method (the ½ mix has none). Rows come group mean
    first, then the ½ mix, Numca and Hista, each method's rows by MAE (ties keep their
    order).
    """
    errors = {label: np.abs(values - targets) for label, values in estimates.items()}
    base, mix = errors[GROUP_MEAN], errors[MIX]
    base_mae = float(base.mean())
    rows = []
    for label, error in errors.items():
        mae, se = clustered_mean(error, clusters)
        rows.append(
            Row(
                label=label,
                method=methods.get(label, "mix"),
                mae=mae,
                se=se,
                ratio=mae / base_mae if base_mae > 0 else float("nan"),
                vs_group_mean=paired_difference(error, base, clusters),
                vs_mix=paired_difference(error, mix, clusters),
            )
        )
    order = {"group_mean": 0, "mix": 1, "numca": 2, "hista": 3, SELF_CALIBRATED: 4}
    return sorted(rows, key=lambda r: (order[r.method], r.mae))


def best_rows(rows: Sequence[Row]) -> dict[str, Row]:
    """The lowest-MAE row of Numca and of Hista (the first listed on a tie)."""
    best: dict[str, Row] = {}
    for row in rows:
        if row.method in ("numca", "hista") and (
            row.method not in best or row.mae < best[row.method].mae
        ):
            best[row.method] = row
    return best


def table(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| method / setting | MAE ± SE | ratio to group mean | − group mean ± SE | − ½ mix ± SE |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        gm, mix = (f"{d:+.4f} ± {s:.4f}" for d, s in (row.vs_group_mean, row.vs_mix))
        lines.append(
            f"| {row.label} | {row.mae:.4f} ± {row.se:.4f} | {row.ratio:.3f} | {gm} | {mix} |"
        )
    return "\n".join(lines)


@dataclass
class Report:
    """What a run did (states in all, done before it, run by it) and, once every state is
    done, what it found: the table's rows, the best row of each method and its params."""

    states: int
    done_before: int
    ran: int
    rows: list[Row] = dataclasses.field(default_factory=list)
    best: dict[str, Row] = dataclasses.field(default_factory=dict)
    params: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    mean_target: float = float("nan")
    reward_agreement: float = float("nan")

    @property
    def complete(self) -> bool:
        return self.done_before + self.ran == self.states

    def text(self) -> str:
        """The table and the recommendation, for people."""
        out = [
            f"{self.states} states, mean Monte Carlo target {self.mean_target:.3f}. The reward "
            f"function gives {self.reward_agreement:.0%} of the rewarded responses the file's "
            "reward"
            + ("." if self.reward_agreement == 1 else ": is it the one they were scored with?"),
            "",
            table(self.rows),
            "",
        ]
        for method, row in self.best.items():
            mix, gm = row.vs_mix, row.vs_group_mean
            verdict = "beats" if beats(mix) else "does not beat"
            out.append(
                f"best {method}: {row.label} (MAE {row.mae:.4f}; vs group mean "
                f"{gm[0]:+.4f} ± {gm[1]:.4f}); it {verdict} the ½ mix by more than two "
                f"paired SEs ({mix[0]:+.4f} ± {mix[1]:.4f})."
            )
        for row in self.rows:
            if row.method == SELF_CALIBRATED:
                mix, gm = row.vs_mix, row.vs_group_mean
                out.append(
                    f"{row.label} (settings chosen from each group's own rewards, no Monte "
                    f"Carlo): MAE {row.mae:.4f}; vs group mean {gm[0]:+.4f} ± {gm[1]:.4f}, "
                    f"vs the ½ mix {mix[0]:+.4f} ± {mix[1]:.4f}."
                )
        if not any(beats(row.vs_mix) for row in self.best.values()):
            out.append(
                "No candidate beats the trivial ½ own reward + ½ group mean by more than two "
                "paired standard errors: on these rollouts the gain of the estimators cannot "
                "be told from noise. More groups, states (--states-per-group) or "
                "continuations (--mc) narrow the errors."
            )
        return "\n".join(out)
