"""Hista from trainer-sent representations against the server's own, on an SVEB-style set.

A trainer may send Hista's representations instead of letting the server run the model
(``statevalue_client.states``; docs/design.md, "Hista states from the trainer"), projected
to fewer dimensions and in half precision to save bytes. This script computes each group's
hidden states once, makes the representations every way the rows name (projection
dimension × dtype), runs Hista on each through the engine's path for sent states, and
prints

- the SVEB accuracy table (MAE against the Monte Carlo targets, ratio to the group mean);
- per row, the mean and largest absolute difference to the values from the server's own
  states over every response token, and the bytes sent per rollout.

Example::

    nice -n 10 python -m bench.sveb.states --split test --limit 50 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.evaluate import (  # noqa: E402
    EngineSpec,
    data_summary,
    evaluate,
    header,
    load_records,
    summary_table,
)
from statevalue.config import HistaConfig  # noqa: E402
from statevalue.estimators.group_mean import group_mean_values  # noqa: E402
from statevalue.estimators.hista import hista_values, hista_values_from_states  # noqa: E402
from statevalue_client.arrays import pack_vectors, unpack_vectors  # noqa: E402
from statevalue_client.states import StatesFormat, group_states  # noqa: E402

# Projection dimensions (None: the full hidden size) and wire dtypes of the rows.
DIMENSIONS = (None, 256, 128, 64)
DTYPES = ("float32", "float16", "bfloat16")
SERVER_LABEL = "hista, server's own states"
SEED = 0


def row_label(dimension: int | None, dtype: str) -> str:
    return f"hista, sent {'full' if dimension is None else dimension}-dim {dtype}"


@dataclass
class Difference:
    """Absolute differences to the server-states values, over every response token."""

    total: float = 0.0
    count: int = 0
    largest: float = 0.0
    bytes_per_rollout: list[int] = field(default_factory=list)

    def add(self, mine: Sequence[np.ndarray], theirs: Sequence[np.ndarray]) -> None:
        gap = np.abs(np.concatenate(mine) - np.concatenate(theirs))
        self.total += float(gap.sum())
        self.count += gap.size
        self.largest = max(self.largest, float(gap.max(initial=0.0)))


class StatesSource:
    """Values of every row for one group from its hidden states (the engine's two paths)."""

    def __init__(self, hidden_size: int, config: HistaConfig) -> None:
        self.config = config
        self.formats = {
            row_label(d, t): StatesFormat.for_hista(
                hidden_size, config.model_dump(), dimension=d, dtype=t, seed=SEED
            )
            for d in DIMENSIONS
            for t in DTYPES
        }
        self.differences = {label: Difference() for label in self.formats}

    def values(
        self, record: dict[str, Any], specs: Sequence[EngineSpec], hidden: list[torch.Tensor]
    ) -> dict[str, list[np.ndarray]]:
        prompt_len = len(record["prompt_ids"])
        lengths = [len(r["ids"]) for r in record["responses"]]
        rewards = np.asarray(record["rewards"], dtype=np.float64)
        rewarded = np.ones(len(lengths), dtype=bool)
        inputs = (prompt_len, lengths, rewards, rewarded, self.config)
        server = hista_values(hidden, *inputs).values
        out = {
            "group mean": group_mean_values(lengths, rewards, rewarded).values,
            SERVER_LABEL: server,
        }
        for label, format in self.formats.items():
            states = group_states(hidden, prompt_len, format)
            sent = []
            for own in states.rollouts:
                vectors = np.concatenate([states.prompt, own])
                data = pack_vectors(vectors, format.dtype)
                # What the server decodes: the rollout's part plus the group's prompt part,
                # which is sent once per group.
                sent.append(unpack_vectors(data, format.dtype, len(vectors), format.dimension))
                share = len(states.prompt) / len(states.rollouts)
                self.differences[label].bytes_per_rollout.append(
                    round((len(own) + share) * format.dimension * (len(data) // vectors.size))
                )
            estimate, _ = hista_values_from_states([torch.from_numpy(s) for s in sent], *inputs)
            out[label] = estimate.values
            self.differences[label].add(estimate.values, server)
        return out


def difference_table(source: StatesSource) -> str:
    lines = [
        "| row | mean abs. difference to server states | largest | bytes per rollout (mean) |",
        "|---|---:|---:|---:|",
    ]
    for label, diff in source.differences.items():
        lines.append(
            f"| {label} | {diff.total / max(diff.count, 1):.2e} | {diff.largest:.2e} "
            f"| {np.mean(diff.bytes_per_rollout):,.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument("--split", default="test", choices=("dev", "test"))
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_arguments(parser, "TorchBackend model")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Print both tables; ``backend`` reuses a loaded TorchBackend (tests)."""
    args = parse_args(argv)
    apply_threads(args)
    if backend is None:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.model, device=args.device)
    records = load_records(args.data_dir, args.split)
    if args.limit:
        records = records[: args.limit]
    source = StatesSource(backend.hidden_size, HistaConfig())
    size = len(records[0]["responses"])
    rows = evaluate(records, source, [], None, backend, None, [size], not args.quiet)[size]
    print(f"## Hista from sent representations — SVEB split {args.split}, G = {size}\n")
    print(header(str(backend.device)))
    print(f"- data: {data_summary(records, rows)}")
    print(f"- Hista at the defaults; projection seed {SEED}\n")
    print(summary_table(rows, list(rows[0].estimates), list(rows[0].floors)))
    print("\nValues from sent representations against the server's own states:\n")
    print(difference_table(source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
