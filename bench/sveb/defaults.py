"""The length-adaptive defaults against the fixed settings, on an SVEB-style set.

The product defaults derive Hista's node spacing and Numca's merge distance from each
group's response lengths (``relative_node_spacing``, ``relative_merge_distance``: fractions
of the median rewarded response length, capped at the reference's 50 tokens). This script

- with ``--grid`` (dev only): runs each fraction of a small grid, every other parameter at
  its product default, to choose the fractions;
- without: compares the defaults with the reference settings, the previous fixed defaults
  (spacing 50, merge 50), the dev-calibrated settings of ``calibrated.json`` and the
  trivial mix ½·R_i + ½·R̄, with paired differences ± prompt-clustered SE, and checks the
  goals of the adaptive defaults.

Hidden states are computed once per group; every row re-runs only the estimators.

Example::

    nice -n 19 python -m bench.sveb.defaults --split dev --grid
    nice -n 19 python -m bench.sveb.defaults --split test
    nice -n 19 python -m bench.sveb.defaults --data-dir bench/sveb/data/long --split dev,test
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.evaluate import (  # noqa: E402
    CALIBRATED_FILE,
    MIX_LABEL,
    EngineSpec,
    InProcessSource,
    StateRow,
    data_summary,
    evaluate,
    header,
    load_records,
    parse_params,
    summary_table,
)
from statevalue.calibration import paired_difference  # noqa: E402
from statevalue.config import HistaConfig, NumcaConfig  # noqa: E402
from statevalue.estimators.hista import group_node_spacing  # noqa: E402
from statevalue.estimators.numca import group_merge_distance  # noqa: E402

SPACING_FRACTIONS = (0.0625, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25)
MERGE_FRACTIONS = (0.01, 0.025, 0.05, 0.1)
# The goals of the adaptive defaults on test and on the long family: ratio to the group
# mean at most this, within this much of the dev-calibrated ratio, and better than the
# trivial mix by more than this many paired standard errors.
GOAL_RATIOS = {"hista": 0.7, "numca": 0.8}
GOAL_GAP = 0.02
GOAL_SE = 2.0


def grid_specs() -> list[EngineSpec]:
    """Group mean, then one row per fraction of each method."""
    specs = [EngineSpec("group mean", "group_mean")]
    grids: list[tuple[str, type[NumcaConfig | HistaConfig], str, tuple[float, ...]]] = [
        ("hista", HistaConfig, "relative_node_spacing", SPACING_FRACTIONS),
        ("numca", NumcaConfig, "relative_merge_distance", MERGE_FRACTIONS),
    ]
    for method, model, relative, fractions in grids:
        specs += [
            EngineSpec(
                f"{method} {relative}={f:g}",
                method,
                **{method: model.model_validate({relative: f})},
            )
            for f in fractions
        ]
    return specs


def comparison_specs(calibrated: dict[str, str]) -> list[EngineSpec]:
    """Group mean, then per method: reference, previous fixed defaults, the adaptive
    defaults and the dev-calibrated setting."""
    specs = [EngineSpec("group mean", "group_mean")]
    methods: list[tuple[str, type[NumcaConfig | HistaConfig], str, str]] = [
        ("numca", NumcaConfig, "relative_merge_distance", "numca_calibrated"),
        ("hista", HistaConfig, "relative_node_spacing", "hista_relative"),
    ]
    for method, model, relative, key in methods:
        settings = {
            f"{method} reference": model.reference(),
            f"{method} previous defaults (fixed 50)": model.model_validate({relative: 0.0}),
            f"{method} defaults (adaptive)": model(),
            f"{method} calibrated on dev": model.reference(**parse_params(calibrated[key])),
        }
        specs += [EngineSpec(label, method, **{method: c}) for label, c in settings.items()]
    return specs


def chosen_lengths(records: Sequence[dict[str, Any]]) -> str:
    """The spacing and merge distance the defaults give, over the groups of ``records``."""
    hista, numca = HistaConfig(), NumcaConfig()
    spacings, merges = [], []
    for record in records:
        lengths = [len(r["ids"]) for r in record["responses"]]
        rewarded = np.ones(len(lengths), dtype=bool)  # every SVEB response has a reward
        spacings.append(group_node_spacing(lengths, rewarded, hista).node_spacing)
        merges.append(group_merge_distance(lengths, rewarded, numca).merge_distance)
    return (
        f"default node spacing per group: median {np.median(spacings):g}, range "
        f"{min(spacings)}–{max(spacings)}; default merge distance per group: median "
        f"{np.median(merges):g}, range {min(merges)}–{max(merges)}"
    )


def goal_lines(rows: Sequence[StateRow]) -> str:
    """Markdown list: the adaptive defaults against each goal."""
    clusters = [r.prompt for r in rows]
    targets = np.array([r.target for r in rows])

    def errors(label: str) -> np.ndarray:
        return np.abs(np.array([r.estimates[label] for r in rows]) - targets)

    group_mean = float(errors("group mean").mean())
    if group_mean == 0:
        return "- none can be judged: the group mean is exact at every state"
    lines = []
    for method, limit in GOAL_RATIOS.items():
        default = errors(f"{method} defaults (adaptive)")
        ratio = float(default.mean()) / group_mean
        calibrated = float(errors(f"{method} calibrated on dev").mean()) / group_mean
        diff, se = paired_difference(default, errors(MIX_LABEL), clusters)
        lines += [
            f"- {method} defaults ≤ {limit} × group mean: "
            f"{'met' if ratio <= limit else 'missed'} ({ratio:.3f} ×)",
            f"- {method} defaults within {GOAL_GAP} of calibrated: "
            f"{'met' if ratio - calibrated <= GOAL_GAP else 'missed'} "
            f"({ratio:.3f} vs {calibrated:.3f})",
            f"- {method} defaults better than ½R_i+½R̄ by > {GOAL_SE:g} SE: "
            f"{'met' if diff < -GOAL_SE * se else 'missed'} ({diff:+.4f} ± {se:.4f})",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument("--split", default="dev", help="dev, test, or both: dev,test")
    parser.add_argument("--calibrated-file", type=Path, default=CALIBRATED_FILE)
    parser.add_argument("--grid", action="store_true", help="the fractions' grid (dev only)")
    add_backend_arguments(parser, "TorchBackend model")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts per split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not args.splits or any(s not in ("dev", "test") for s in args.splits):
        parser.error("--split must be dev, test or dev,test")
    if args.grid and args.splits != ["dev"]:
        parser.error("--grid chooses the defaults: run it on dev only")
    return args


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Print the grid or the comparison table; returns the process exit status."""
    args = parse_args(argv)
    apply_threads(args)
    records = []
    for split in args.splits:
        split_records = [r for r in load_records(args.data_dir, split) if r["states"]]
        records += split_records[: args.limit] if args.limit else split_records
    if not records:
        raise SystemExit(f"no states in {args.data_dir} split {args.split}")
    calibrated = json.loads(args.calibrated_file.read_text())
    specs = grid_specs() if args.grid else comparison_specs(calibrated)
    if backend is None:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.model, device=args.device)
    group_size = len(records[0]["responses"])
    rows = evaluate(
        records, InProcessSource(backend), specs, None, backend, None, [group_size], not args.quiet
    )[group_size]
    title = "grid" if args.grid else "defaults vs fixed settings"
    print(f"## SVEB length-adaptive {title} — {args.data_dir.name}, split {args.split}\n")
    print(header(str(backend.device)))
    print(f"- data: {data_summary(records, rows)}")
    if not args.grid:
        print(f"- {chosen_lengths(records)}")
    print(
        f"- dev-calibrated ({args.calibrated_file.name}): "
        f"numca `{calibrated['numca_calibrated']}`, hista `{calibrated['hista_relative']}`\n"
    )
    print(summary_table(rows, list(rows[0].estimates), []))
    if not args.grid:
        print("\nGoals of the adaptive defaults:\n")
        print(goal_lines(rows))
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
