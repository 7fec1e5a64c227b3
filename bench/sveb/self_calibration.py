"""Self-calibration against the defaults, the dev-calibrated settings and the trivial mix.

Self-calibration (``params.self_calibration``, docs/design.md "Self-calibration") chooses
Hista's and Numca's settings per request from the rollouts' own rewards. This script
sends the groups of an SVEB split as steps of ``--step-size`` prompts (one request each,
so ``scope = "request"`` pools a step), at G = 16 and as subgroups of 8 (the state's
response and 7 others, as ``evaluate.py`` draws them), and compares at every benchmark
state, against its Monte Carlo target:

- the group mean, the trivial mix ½·R_i + ½·R̄, the defaults of Hista and Numca and the
  settings calibrated on dev with Monte Carlo targets (``calibrated.json``);
- self-calibrated Hista and Numca, choosing per step and per group; with ``--variants``
  also without blends, without the own-reward weight and with the single own weight
  fitted by the covariance rule instead of the anchored one (the choices made on dev).

Hidden states are computed once per group (and kept in ``--cache-dir`` for reruns);
every row re-runs only the estimators. With ``--timing``, a second table gives the
estimator time per step with and without self-calibration (all three methods, the same
requests, the least of two runs each; the forward pass is the same for both and not
repeated).

Example::

    nice -n 10 python -m bench.sveb.self_calibration --split test --threads 1 --quiet
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.evaluate import (  # noqa: E402
    CALIBRATED_FILE,
    MIX_LABEL,
    StateRow,
    data_summary,
    group_hidden,
    group_views,
    header,
    load_records,
    parse_params,
    summary_table,
)
from statevalue.calibration import paired_difference  # noqa: E402
from statevalue.config import EstimatorConfig, HistaConfig, NumcaConfig  # noqa: E402


@dataclass(frozen=True)
class Row:
    """One table row: a method under one configuration."""

    label: str
    method: str
    config: EstimatorConfig


def rows(calibrated: dict[str, Any], variants: bool) -> list[Row]:
    """The rows of the table, the group mean first."""
    hista_mc = HistaConfig.reference(**parse_params(calibrated["hista_relative"]))
    numca_mc = NumcaConfig.reference(**parse_params(calibrated["numca_calibrated"]))
    out = [
        Row("group mean", "group_mean", EstimatorConfig()),
        Row("hista defaults", "hista", EstimatorConfig()),
        Row("numca defaults", "numca", EstimatorConfig()),
        Row("hista dev-MC-calibrated", "hista", EstimatorConfig(hista=hista_mc)),
        Row("numca dev-MC-calibrated", "numca", EstimatorConfig(numca=numca_mc)),
    ]
    settings: dict[str, dict[str, Any]] = {
        "per step": {"scope": "request"},
        "per group": {"scope": "group"},
    }
    if variants:
        settings |= {
            "per step, no blends": {"scope": "request", "combine": False},
            "per step, no own reward": {"scope": "request", "own_weight": "none"},
            "per step, covariance own weight": {"scope": "request", "own_weight": "fitted"},
        }
    for method in ("hista", "numca"):
        for name, fields in settings.items():
            config = EstimatorConfig.model_validate(
                {"self_calibration": {"enabled": True, **fields}}
            )
            out.append(Row(f"{method} self-calibrated, {name}", method, config))
    return out


@dataclass
class Timing:
    """Estimator seconds of every step, without and with self-calibration."""

    plain: list[float]
    calibrated: list[float]
    forward: list[float]


def record_hidden(backend: Any, record: dict[str, Any], cache: Path | None) -> list[Any]:
    """The hidden states of a record's rollouts, kept in ``cache`` (a folder) when given."""
    import torch

    if cache is None:
        return group_hidden(backend, record)
    identity = backend.identity
    path = cache / f"{identity.name}-{identity.version}-{record['id']}.pt"
    if path.exists():
        return torch.load(path)
    hidden = group_hidden(backend, record)
    cache.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: a run reading the folder meanwhile never sees half a file.
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(hidden, partial)
    partial.replace(path)
    return hidden


def run_steps(
    records: Sequence[dict[str, Any]],
    backend: Any,
    table_rows: Sequence[Row],
    group_sizes: Sequence[int],
    step_size: int,
    cache: Path | None,
    timed: bool,
    progress: bool,
) -> dict[int, tuple[list[StateRow], Timing]]:
    """Per group size: every state of ``records``, its target and each row's estimate; and
    the timing. Hidden states are computed once per record for every group size."""
    from tqdm import tqdm

    from statevalue.engine import Engine

    engine = Engine(backend)
    out = {size: ([], Timing([], [], [])) for size in group_sizes}
    steps = [records[i : i + step_size] for i in range(0, len(records), step_size)]
    for step in tqdm(steps, desc="steps", disable=not progress):
        started = time.perf_counter()
        hidden = [record_hidden(backend, record, cache) for record in step]
        forward = time.perf_counter() - started
        for size in group_sizes:
            states, timing = out[size]
            timing.forward.append(forward)
            states += step_states(engine, step, hidden, table_rows, size, timing, timed)
    return out


def step_states(
    engine: Any,
    step: Sequence[dict[str, Any]],
    hidden: Sequence[list[Any]],
    table_rows: Sequence[Row],
    group_size: int,
    timing: Timing,
    timed: bool,
) -> list[StateRow]:
    """One step as one request at ``group_size``: a row per state; adds to ``timing``."""
    from statevalue.engine import PreparedRequest
    from statevalue.schema import EstimateRequest, GroupInput, RolloutInput

    groups, sequences, where = [], [], []
    for record, record_hidden_ in zip(step, hidden, strict=True):
        for view, view_hidden, view_states in group_views(record, record_hidden_, group_size):
            groups.append(
                GroupInput(
                    group_id=f"{record['id']}-{len(groups)}",
                    prompt_ids=np.asarray(view["prompt_ids"], dtype=np.int64),
                    rollouts=[
                        RolloutInput(
                            response_ids=np.asarray(r["ids"], dtype=np.int64), reward=r["reward"]
                        )
                        for r in view["responses"]
                    ],
                )
            )
            assert view_hidden is not None
            sequences += view_hidden
            where += [(len(groups) - 1, record, view, s) for s in view_states]
    prepared = engine.prepare(EstimateRequest(groups=groups, methods=("group_mean",)))

    def compute(methods: tuple[str, ...], config: EstimatorConfig) -> Any:
        request = PreparedRequest(groups=prepared.groups, methods=methods, config=config)
        return engine.compute(request, sequences)

    if timed:
        # The least of two runs: a busy machine only ever adds time.
        everything = ("numca", "hista", "group_mean")
        calibrate = EstimatorConfig.model_validate({"self_calibration": {"enabled": True}})
        for times, config in ((timing.plain, EstimatorConfig()), (timing.calibrated, calibrate)):
            times.append(min(compute(everything, config).estimator_seconds for _ in range(2)))
    values = {row.label: compute((row.method,), row.config) for row in table_rows}
    states = []
    for g, record, view, state in where:
        i, t = state["response"], state["t"]
        rewards = np.asarray(view["rewards"], dtype=np.float64)
        row = StateRow(prompt=record["id"], family=record["family"], target=state["target"])
        for spec in table_rows:
            rollout = values[spec.label].groups[g].rollouts[i]
            row.estimates[spec.label] = float(rollout.values[spec.method][t])
        row.estimates[MIX_LABEL] = 0.5 * rewards[i] + 0.5 * rewards.mean()
        states.append(row)
    return states


def against_defaults(states: Sequence[StateRow]) -> str:
    """Markdown table: each self-calibrated row's absolute error minus its method's
    defaults', ± SE clustered by prompt (negative = better)."""
    clusters = [r.prompt for r in states]
    targets = np.array([r.target for r in states])

    def errors(label: str) -> np.ndarray:
        return np.abs(np.array([r.estimates[label] for r in states]) - targets)

    lines = ["| self-calibrated row | − its method's defaults ± SE |", "|---|---|"]
    for label in states[0].estimates:
        method = label.split(" ")[0]
        if "self-calibrated" in label:
            diff, se = paired_difference(errors(label), errors(f"{method} defaults"), clusters)
            lines.append(f"| {label} | {diff:+.4f} ± {se:.4f} |")
    return "\n".join(lines)


def timing_table(timing: Timing, step_size: int, group_size: int) -> str:
    """Markdown table: estimator seconds per step without and with self-calibration."""
    plain, calibrated = np.array(timing.plain), np.array(timing.calibrated)
    extra = calibrated - plain
    return "\n".join(
        [
            f"Estimator time per step ({step_size} prompts, G = {group_size}; numca, hista and "
            "group mean; median over steps; hidden states: the forward pass, or reading them "
            "from --cache-dir):\n",
            "| hidden states s | estimators s | with self-calibration s | extra s | extra % |",
            "|---|---|---|---|---|",
            f"| {np.median(timing.forward):.3f} | {np.median(plain):.3f} "
            f"| {np.median(calibrated):.3f} | {np.median(extra):+.3f} "
            f"| {100 * np.median(extra / plain):+.1f} |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--calibrated-file", type=Path, default=CALIBRATED_FILE)
    parser.add_argument("--group-sizes", default="16,8", help="(%(default)s)")
    parser.add_argument("--step-size", type=int, default=8, help="prompts per step (%(default)s)")
    parser.add_argument("--variants", action="store_true", help="also the dev variants")
    parser.add_argument(
        "--timing", action="store_true", help="also time the estimators with and without"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="keep each record's hidden states here"
    )
    add_backend_arguments(parser, "TorchBackend model")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts (0: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.group_size_list = [int(g) for g in args.group_sizes.split(",") if g.strip()]
    if not args.group_size_list or min(args.group_size_list) < 2 or args.step_size < 1:
        parser.error("--group-sizes must be integers >= 2 and --step-size >= 1")
    return args


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Print one accuracy table per group size and the timing; returns the exit status."""
    args = parse_args(argv)
    apply_threads(args)
    records = [r for r in load_records(args.data_dir, args.split) if r["states"]]
    records = records[: args.limit] if args.limit else records
    if not records:
        raise SystemExit(f"no states in {args.data_dir} split {args.split}")
    calibrated = json.loads(args.calibrated_file.read_text())
    table_rows = rows(calibrated, args.variants)
    if backend is None:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.model, device=args.device)
    sizes = [min(g, len(records[0]["responses"])) for g in args.group_size_list]
    results = run_steps(
        records,
        backend,
        table_rows,
        sizes,
        args.step_size,
        args.cache_dir,
        args.timing,
        not args.quiet,
    )
    for size, (states, timing) in results.items():
        print(f"## SVEB self-calibration — split {args.split}, G = {size}\n")
        print(header(str(backend.device)))
        print(f"- data: {data_summary(records, states)}")
        print(f"- steps of {args.step_size} prompts, one request each\n")
        print(summary_table(states, list(states[0].estimates), []))
        print()
        print(against_defaults(states))
        print()
        if args.timing:
            print(timing_table(timing, args.step_size, size))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
