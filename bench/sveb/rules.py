"""Reference rule vs the alternative, one rule at a time, on an SVEB-style split.

For every rule option of ``NumcaConfig`` and ``HistaConfig`` that has a reference choice
and an alternative, the estimator runs once with every rule at the reference choice (on
top of the dev-calibrated spacing / merge / clamp of ``calibrated.json``) and once with
only that rule switched. The table gives each MAE and the paired difference
(alternative − reference) with its standard error clustered by prompt. A product default
leaves the reference rule only where the alternative is better on dev by more than two
paired standard errors. Hidden states are computed once per group.

Example::

    nice -n 10 python -m bench.sveb.rules --split dev
    nice -n 10 python -m bench.sveb.rules --split test
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.evaluate import (  # noqa: E402
    EngineSpec,
    InProcessSource,
    group_hidden,
    header,
    load_records,
    paired,
    parse_params,
)
from statevalue.config import HistaConfig, NumcaConfig  # noqa: E402

NUMCA_RULES = ("number_boundary", "table_states", "unseen_state")
HISTA_RULES = (
    "ema_start",
    "downsample",
    "node_anchor",
    "end_node",
    "k_schedule",
    "neighbours",
    "own_nodes",
)


def alternative(model: type[NumcaConfig | HistaConfig], rule: str, reference: str) -> str:
    """The choice of a two-way rule option that is not the reference's."""
    (other,) = set(typing.get_args(model.model_fields[rule].annotation)) - {reference}
    return str(other)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument("--split", default="dev", choices=("dev", "test"))
    parser.add_argument(
        "--calibrated", type=Path, default=Path("bench/sveb/results/calibrated.json")
    )
    add_backend_arguments(parser, "TorchBackend model")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Print the rule table; returns the process exit status."""
    args = parse_args(argv)
    apply_threads(args)
    from tqdm import tqdm

    records = [r for r in load_records(args.data_dir, args.split) if r["states"]]
    if args.limit:
        records = records[: args.limit]
    if backend is None:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.model, device=args.device)
    source = InProcessSource(backend)
    hidden = [group_hidden(backend, record) for record in tqdm(records, desc="hidden states")]
    calibrated = json.loads(args.calibrated.read_text())
    numca_base = NumcaConfig.reference(**parse_params(calibrated["numca_calibrated"]))
    hista_base = HistaConfig.reference(**parse_params(calibrated["hista_relative"]))

    targets = np.array([s["target"] for r in records for s in r["states"]])
    clusters = [r["id"] for r in records for _ in r["states"]]

    def errors(spec: EngineSpec) -> np.ndarray:
        estimates = []
        for record, states in zip(records, hidden, strict=True):
            values = source.values(record, [spec], states)[spec.label]
            estimates.extend(float(values[s["response"]][s["t"]]) for s in record["states"])
        return np.abs(np.array(estimates) - targets)

    group_mean = errors(EngineSpec("group mean", "group_mean"))
    reference_mae = float(group_mean.mean())
    print(f"## Reference rules vs alternatives — split {args.split}\n")
    print(header(str(backend.device)))
    print(
        f"- data: {len(records)} prompts, {len(targets)} states; group-mean MAE {reference_mae:.4f}"
    )
    print(f"- numca base (reference rules): `{calibrated['numca_calibrated']}`")
    print(f"- hista base (reference rules): `{calibrated['hista_relative']}`\n")
    print(
        "| method | rule | reference | alternative | MAE ref | MAE alt | alt − ref ± SE | better |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows: list[tuple[str, type[NumcaConfig | HistaConfig], Any, tuple[str, ...]]] = [
        ("numca", NumcaConfig, numca_base, NUMCA_RULES),
        ("hista", HistaConfig, hista_base, HISTA_RULES),
    ]
    for method, model, base, rules in rows:
        base_errors = errors(EngineSpec(f"{method} base", method, **{method: base}))
        for rule in tqdm(rules, desc=method, leave=False):
            ref_choice = getattr(base, rule)
            alt_choice = alternative(model, rule, ref_choice)
            switched = base.model_copy(update={rule: alt_choice})
            alt_errors = errors(EngineSpec(f"{method} {rule}", method, **{method: switched}))
            diff, se = paired(alt_errors, base_errors, clusters)
            better = "alternative" if diff < -2 * se else "reference" if diff > 2 * se else "tie"
            print(
                f"| {method} | {rule} | {ref_choice} | {alt_choice} | {base_errors.mean():.4f} | "
                f"{alt_errors.mean():.4f} | {diff:+.4f} ± {se:.4f} | {better} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
