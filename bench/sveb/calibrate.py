"""Calibrate Numca and Hista parameters on the dev split of the SVEB-style set.

Hidden states are computed once per group (``backend.hidden_states``) and only the
estimators re-run (``Engine.compute``) for each parameter set of a small grid. Searches:

- Hista with the reference rule: node spacing × absolute ``d_min`` × k schedule;
- Hista with ``relative_d_min`` (the clamp as a fraction of the group's distance scale);
- Hista with ``own_weight`` < 1 on the rollout's own prefix nodes (with a relative clamp);
- Numca with the reference rule: number pattern × merge distance;
- Numca with shrinkage towards the parent state: the same × ``prior_count``;
- the mix w·Numca + (1 − w)·Hista of the best of each; kept only if it beats both.

It also prints the distance histograms that explain Hista's behaviour. Never run it on
test.

Example::

    nice -n 10 python -m bench.sveb.calibrate --write bench/sveb/results/calibrated.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.evaluate import (  # noqa: E402
    EngineSpec,
    InProcessSource,
    group_hidden,
    group_views,
    header,
    load_records,
    parse_params,
    ratio_text,
)
from statevalue.calibration import clustered_mean  # noqa: E402
from statevalue.config import HistaConfig, NumcaConfig  # noqa: E402
from statevalue.estimators.hista import (  # noqa: E402
    hista_nodes,
    hista_representation,
    node_prefix_lengths,
    prefix_distances,
)

SPACINGS = (5, 10, 20, 50)
D_MINS = (0.25, 0.5, 1.0, 2.0, 5.0)
KS = ((66, 6), (16, 4), (8, 2))
MERGES = (0, 2, 5, 10, 20, 50)
PATTERNS = ("digits", "decimal")
RELATIVE = (0.01, 0.025, 0.05, 0.1, 0.25)
OWN_WEIGHTS = (0.5, 0.25, 0.1, 0.0)
PRIORS = (1.0, 2.0, 4.0, 8.0)
MIX_WEIGHTS = (0.25, 0.5, 0.75)


View = tuple[dict[str, Any], list[torch.Tensor], list[dict[str, Any]]]


def state_estimates(views: Sequence[View], values: Sequence[list[np.ndarray]]) -> np.ndarray:
    """The estimate at every state of ``views``, in order."""
    return np.array(
        [
            float(group_values[state["response"]][state["t"]])
            for (_, _, states), group_values in zip(views, values, strict=True)
            for state in states
        ]
    )


def node_distances(
    group: dict[str, Any], hidden: Sequence[torch.Tensor], config: HistaConfig
) -> tuple[np.ndarray, np.ndarray, float]:
    """Distances at the interior nodes of one group, divided by the group's distance scale.

    Returns (to the previous node of the same rollout; to the nearest node of each other
    rollout; the scale = median distance between complete rollouts).
    """
    prompt_len = len(group["prompt_ids"])
    padded, counts = hista_representation(list(hidden), config)
    reps = [padded[i, : counts[i]] for i in range(len(hidden))]

    def prefixes(i: int, positions: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(node_prefix_lengths(prompt_len, positions, len(reps[i]), config))

    def distances(i: int, x: torch.Tensor, j: int, y: torch.Tensor) -> np.ndarray:
        return prefix_distances(reps[i][None], reps[j][None], x[None], y[None])[0].numpy()

    whole = [torch.tensor([len(r)]) for r in reps]
    # Both directions of every pair, as the engine's relative clamp computes its scale.
    full = [
        distances(i, whole[i], j, whole[j])[0, 0]
        for i in range(len(reps))
        for j in range(len(reps))
        if i != j
    ]
    scale = float(np.median(full)) if full else 1.0
    lengths = [len(r["ids"]) for r in group["responses"]]
    nodes = [hista_nodes(prompt_len, length, config) for length in lengths]
    own, other = [], []
    for i in range(len(lengths)):
        interior = nodes[i].interior
        if not len(interior):
            continue
        query = prefixes(i, interior)
        previous = nodes[i].candidates[np.searchsorted(nodes[i].candidates, interior) - 1]
        own.append(np.diag(distances(i, query, i, prefixes(i, previous))))
        for j in range(len(reps)):
            if j != i:
                other.append(distances(i, query, j, prefixes(j, nodes[j].candidates)).min(1))
    flat = [np.concatenate(parts) / scale if parts else np.zeros(0) for parts in (own, other)]
    return flat[0], flat[1], scale


def distance_histograms(views: Sequence[View], config: HistaConfig) -> str:
    """Where Hista's neighbours lie: quantiles of ``node_distances`` over all groups.

    Distances are in units of the group's distance scale, the unit of ``relative_d_min``.
    """
    own, other, scales = [], [], []
    for group, hidden, _ in views:
        group_own, group_other, scale = node_distances(group, hidden, config)
        own.append(group_own)
        other.append(group_other)
        scales.append(scale)
    quantiles = (0.05, 0.25, 0.5, 0.75, 0.95)
    lines = [
        "| distance / group scale | nodes | " + " | ".join(f"q{q:g}" for q in quantiles) + " |",
        "|---|---|" + "---|" * len(quantiles),
    ]
    for name, parts in (
        ("previous node, same rollout", own),
        ("nearest node, other rollout", other),
    ):
        data = np.concatenate(parts)
        cells = " | ".join(f"{v:.3f}" for v in np.quantile(data, quantiles)) if len(data) else ""
        lines.append(f"| {name} | {len(data)} | {cells} |")
    lines.append(
        f"\nGroup distance scale (median complete-rollout distance): median "
        f"{np.median(scales):.2f}, range {min(scales):.2f}–{max(scales):.2f}."
    )
    return "\n".join(lines)


@dataclass
class Search:
    """One grid search: its title and, per setting label, the estimate at every state."""

    title: str
    estimates: dict[str, np.ndarray]

    def errors(self, label: str, targets: np.ndarray) -> np.ndarray:
        return np.abs(self.estimates[label] - targets)

    def best(self, targets: np.ndarray) -> str:
        """Label of the lowest-MAE setting (the first one on ties: grids list simpler first)."""
        return min(self.estimates, key=lambda label: float(self.errors(label, targets).mean()))


def ranking(
    rows: dict[str, np.ndarray], clusters: Sequence[str], reference: float, top: int
) -> str:
    """Markdown table of the ``top`` lowest-MAE rows (label -> absolute errors)."""
    scored = sorted(
        ((*clustered_mean(err, clusters), label) for label, err in rows.items()),
        key=lambda item: item[0],
    )
    lines = ["| setting | MAE ± SE | ratio to group mean |", "|---|---|---|"]
    for mae, se, label in scored[:top]:
        lines.append(f"| {label} | {mae:.4f} ± {se:.4f} | {ratio_text(mae, reference)} |")
    return "\n".join(lines)


def settings_label(params: dict[str, Any]) -> str:
    """``{"a": 1, "b": 0.5}`` -> ``"a=1,b=0.5"`` (the form evaluate.py parses)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


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
    parser.add_argument(
        "--group-size", type=int, default=16, help="calibrate on (sub)groups of this size"
    )
    parser.add_argument("--top", type=int, default=8, help="rows per ranking")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument(
        "--write", type=Path, help="write the best setting of each search as JSON (for evaluate)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Run the grids and print the rankings; returns the process exit status.

    ``backend`` reuses an already loaded TorchBackend (tests) instead of loading ``--model``.
    """
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
    views: list[View] = []
    for record in tqdm(records, desc="hidden states"):
        views.extend(group_views(record, group_hidden(backend, record), args.group_size))

    def values(spec: EngineSpec) -> list[list[np.ndarray]]:
        return [source.values(group, [spec], h)[spec.label] for group, h, _ in views]

    def search(title: str, method: str, grid: Sequence[dict[str, Any]]) -> Search:
        estimates = {}
        for params in tqdm(grid, desc=title.split(":")[0]):
            label = settings_label(params)
            if method == "numca":
                spec = EngineSpec(label, "numca", numca=NumcaConfig.reference(**params))
            else:
                spec = EngineSpec(label, "hista", hista=HistaConfig.reference(**params))
            estimates[label] = state_estimates(views, values(spec))
        return Search(title, estimates)

    targets = np.array([state["target"] for _, _, states in views for state in states])
    clusters = [group["id"] for group, _, states in views for _ in states]
    group_mean = state_estimates(views, values(EngineSpec("group mean", "group_mean")))
    reference = float(np.abs(group_mean - targets).mean())
    norms = [float(h[0].norm(dim=-1).mean()) for _, h, _ in views]
    size = min(args.group_size, len(records[0]["responses"]))
    print(f"## SVEB calibration — split {args.split}, G = {size}\n")
    print(header(str(backend.device)))
    print(f"- data: {len(records)} prompts, {len(targets)} states; group-mean MAE {reference:.4f}")
    print(f"- last-layer hidden-state norm (mean over tokens): {np.mean(norms):.1f}\n")

    k_pairs = [{"k_max": k_max, "k_min": k_min} for k_max, k_min in KS]
    searches = {
        "hista_calibrated": search(
            "Hista, reference rule: node_spacing × d_min × k",
            "hista",
            [
                {"node_spacing": n, "d_min": d, **k}
                for n, d, k in itertools.product(SPACINGS, D_MINS, k_pairs)
            ],
        ),
        "hista_relative": search(
            "Hista, relative d_min: node_spacing × relative_d_min × k",
            "hista",
            [
                {"node_spacing": n, "relative_d_min": r, **k}
                for n, r, k in itertools.product(SPACINGS[:3], RELATIVE, k_pairs)
            ],
        ),
        "hista_own_weight": search(
            "Hista + own_weight: node_spacing × relative_d_min × k × own_weight",
            "hista",
            [
                {"node_spacing": n, "relative_d_min": r, **k, "own_weight": w}
                for n, r, k, w in itertools.product(SPACINGS[:3], RELATIVE, k_pairs, OWN_WEIGHTS)
            ],
        ),
        "numca_calibrated": search(
            "Numca, reference rule: number_pattern × merge_distance",
            "numca",
            [
                {"number_pattern": p, "merge_distance": m}
                for p, m in itertools.product(PATTERNS, MERGES)
            ],
        ),
        "numca_shrunk": search(
            "Numca + shrinkage: number_pattern × merge_distance × prior_count",
            "numca",
            [
                {"number_pattern": p, "merge_distance": m, "prior_count": c}
                for p, m, c in itertools.product(PATTERNS, MERGES, PRIORS)
            ],
        ),
    }
    chosen: dict[str, Any] = {key: found.best(targets) for key, found in searches.items()}
    for found in searches.values():
        errors = {label: found.errors(label, targets) for label in found.estimates}
        print(f"### {found.title}\n")
        print(ranking(errors, clusters, reference, args.top))
        print()

    def mae(key: str) -> float:
        return float(searches[key].errors(chosen[key], targets).mean())

    best_numca = min(("numca_calibrated", "numca_shrunk"), key=mae)
    best_hista = min(("hista_calibrated", "hista_relative", "hista_own_weight"), key=mae)
    numca = searches[best_numca].estimates[chosen[best_numca]]
    hista = searches[best_hista].estimates[chosen[best_hista]]
    mixes = {f"w={w:g}": np.abs(w * numca + (1 - w) * hista - targets) for w in MIX_WEIGHTS}
    print(f"### Mix w·numca + (1 − w)·hista ({best_numca} × {best_hista})\n")
    print(ranking(mixes, clusters, reference, len(mixes)))
    mix_weight = min(MIX_WEIGHTS, key=lambda w: float(mixes[f"w={w:g}"].mean()))
    beats_both = float(mixes[f"w={mix_weight:g}"].mean()) < min(mae(best_numca), mae(best_hista))
    chosen.update(
        mix_weight=mix_weight if beats_both else None, best_numca=best_numca, best_hista=best_hista
    )
    verdict = "beats both: kept" if beats_both else "does not beat both: dropped"
    print(f"\nBest mix w = {mix_weight:g}: {verdict}.\n")

    hista_config = HistaConfig.reference(**parse_params(chosen[best_hista]))
    print(f"### Distance histograms (node_spacing {hista_config.node_spacing})\n")
    print(distance_histograms(views, hista_config))
    print("\n### Best settings on dev\n")
    for name, value in chosen.items():
        print(f"- {name}: `{value}`")
    if args.write:
        args.write.write_text(json.dumps(chosen, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
