"""Calibrate Numca and Hista parameters on the dev split of the SVEB-style set.

Hidden states are computed once per group (``Engine.prepare`` + ``backend.hidden_states``)
and only the estimators re-run (``Engine.compute``) for each parameter set of a small grid.
Also searches the prototype rules of ``bench/sveb/prototypes.py`` (Hista d_min relative to
the group's distance scale; Numca shrunk towards the parent state). Never run it on test.

Example::

    nice -n 10 python -m bench.sveb.calibrate --split dev
"""

from __future__ import annotations

import argparse
import itertools
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
    EngineSpec,
    InProcessSource,
    clustered_mae,
    group_hidden,
    header,
    load_records,
)
from bench.sveb.prototypes import (  # noqa: E402
    group_distance_scale,
    hista_relative_values,
    numca_shrunk_values,
)
from statevalue.config import HistaConfig, NumcaConfig  # noqa: E402

SPACINGS = (5, 10, 20, 50)
D_MINS = (0.5, 1.0, 2.0, 5.0)
KS = ((66, 6), (16, 4), (8, 2))
MERGES = (0, 2, 5, 10, 20, 50)
PATTERNS = ("digits", "decimal")
RELATIVE = (0.05, 0.1, 0.25, 0.5)
PRIORS = (0.0, 1.0, 2.0, 4.0)


def state_errors(
    records: Sequence[dict[str, Any]], values: Sequence[list[np.ndarray]]
) -> tuple[np.ndarray, list[str]]:
    """Absolute error at every state, and each state's prompt id (for clustered SEs)."""
    errors, clusters = [], []
    for record, group_values in zip(records, values, strict=True):
        for state in record["states"]:
            estimate = float(group_values[state["response"]][state["t"]])
            errors.append(abs(estimate - state["target"]))
            clusters.append(record["id"])
    return np.array(errors), clusters


def best(results: list[tuple[str, np.ndarray, list[str]]]) -> str:
    """Label of the lowest-MAE setting (the first one on ties: grids list simpler first)."""
    return min(results, key=lambda item: float(item[1].mean()))[0]


def ranking(results: list[tuple[str, np.ndarray, list[str]]], reference: float, top: int) -> str:
    """Markdown table of the ``top`` lowest-MAE settings."""
    scored = sorted(
        ((*clustered_mae(err, clusters), label) for label, err, clusters in results),
        key=lambda item: item[0],
    )
    lines = ["| setting | MAE ± SE | ratio to group mean |", "|---|---|---|"]
    for mae, se, label in scored[:top]:
        lines.append(f"| {label} | {mae:.4f} ± {se:.4f} | {mae / reference:.3f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument(
        "--split", default="dev", choices=("dev",), help="only dev: never tune on test"
    )
    add_backend_arguments(parser, "TorchBackend model")
    parser.add_argument("--top", type=int, default=8, help="rows per ranking")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument(
        "--write", type=Path, help="write the best setting of each search as JSON (for evaluate)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the grid and print the rankings; returns the process exit status."""
    args = parse_args(argv)
    apply_threads(args)
    from tqdm import tqdm

    from statevalue.backends.torch_backend import TorchBackend

    records = [r for r in load_records(args.data_dir, args.split) if r["states"]]
    if args.limit:
        records = records[: args.limit]
    backend = TorchBackend(args.model, device=args.device)
    source = InProcessSource(backend)
    hidden = [group_hidden(backend, r) for r in tqdm(records, desc="hidden states")]

    def run(spec: EngineSpec) -> tuple[np.ndarray, list[str]]:
        values = [
            source.values(r, [spec], h)[spec.label] for r, h in zip(records, hidden, strict=True)
        ]
        return state_errors(records, values)

    gm_err, _ = run(EngineSpec("group mean", "group_mean"))
    reference = float(gm_err.mean())
    scales = [group_distance_scale(h, HistaConfig()) for h in hidden]
    norms = [float(h[0].norm(dim=-1).mean()) for h in hidden]
    print(f"## SVEB calibration — split {args.split}\n")
    print(header(str(backend.device)))
    n_states = sum(len(r["states"]) for r in records)
    print(f"- data: {len(records)} prompts, {n_states} states; group-mean MAE {reference:.4f}")
    print(
        f"- last-layer hidden-state norm (mean over tokens): {np.mean(norms):.1f}; group distance "
        f"scale (median complete-rollout Chamfer distance, ema 0.7, stride 5): median "
        f"{np.median(scales):.2f}, range {min(scales):.2f}–{max(scales):.2f}\n"
    )

    hista_results = []
    grid = list(itertools.product(SPACINGS, D_MINS, KS))
    for spacing, d_min, (k_max, k_min) in tqdm(grid, desc="hista grid"):
        config = HistaConfig(node_spacing=spacing, d_min=d_min, k_max=k_max, k_min=k_min)
        label = f"node_spacing={spacing},d_min={d_min},k_max={k_max},k_min={k_min}"
        hista_results.append((label, *run(EngineSpec(label, "hista", hista=config))))
    print("### Hista grid (node_spacing × d_min × k_max/k_min)\n")
    print(ranking(hista_results, reference, args.top))

    numca_results = []
    for pattern, merge in itertools.product(PATTERNS, MERGES):
        config = NumcaConfig(number_pattern=pattern, merge_distance=merge)
        label = f"number_pattern={pattern},merge_distance={merge}"
        numca_results.append((label, *run(EngineSpec(label, "numca", numca=config))))
    print("\n### Numca grid (number_pattern × merge_distance)\n")
    print(ranking(numca_results, reference, len(numca_results)))

    relative_results = []
    for spacing, relative, (k_max, k_min) in tqdm(
        list(itertools.product(SPACINGS[:3], RELATIVE, KS)), desc="relative d_min"
    ):
        config = HistaConfig(node_spacing=spacing, k_max=k_max, k_min=k_min)
        values = [
            hista_relative_values(
                h,
                len(r["prompt_ids"]),
                [len(x["ids"]) for x in r["responses"]],
                np.asarray(r["rewards"]),
                config,
                relative,
                scale,
            )[0]
            for r, h, scale in zip(records, hidden, scales, strict=True)
        ]
        label = f"node_spacing={spacing},k_max={k_max},k_min={k_min},relative_d_min={relative}"
        relative_results.append((label, *state_errors(records, values)))
    print("\n### Prototype: Hista with d_min = relative_d_min × group distance scale\n")
    print(ranking(relative_results, reference, args.top))

    shrunk_results = []
    for pattern, merge, prior in itertools.product(PATTERNS, (0, 5, 10, 50), PRIORS):
        config = NumcaConfig(number_pattern=pattern, merge_distance=merge)
        values = [
            numca_shrunk_values(
                source.engine.token_text,
                [np.asarray(x["ids"]) for x in r["responses"]],
                r["rewards"],
                config,
                prior,
            )
            for r in records
        ]
        label = f"number_pattern={pattern},merge_distance={merge},prior_count={prior:g}"
        shrunk_results.append((label, *state_errors(records, values)))
    print("\n### Prototype: Numca shrunk towards the parent state (prior_count pseudo-visits)\n")
    print(ranking(shrunk_results, reference, args.top))
    chosen = {
        "hista_calibrated": best(hista_results),
        "numca_calibrated": best(numca_results),
        "proto_hista": best(relative_results),
        "proto_numca": best(shrunk_results),
    }
    print("\n### Best settings on dev\n")
    for name, value in chosen.items():
        print(f"- {name}: `{value}`")
    if args.write:
        args.write.write_text(json.dumps(chosen, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
