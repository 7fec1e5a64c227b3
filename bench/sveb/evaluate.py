"""Evaluate value estimators on an SVEB-style set (see ``bench/sveb/generate.py``).

Every group of the chosen split goes through the statevalue service — the public gRPC
client against ``--target host:port``, or the engine in-process with ``--in-process`` —
and the value ``values[i][t]`` at each benchmark state (response i, position t) is compared
with the state's Monte Carlo target (mean reward of its K continuations).

Methods in the table:

- from the service: group mean; Numca (digits / decimal with the reference settings;
  calibrated on dev with the reference rule; calibrated with shrinkage towards the parent
  state, ``prior_count``); Hista (reference defaults; calibrated on dev with an absolute
  ``d_min``; with ``relative_d_min``; with ``own_weight`` on the rollout's own nodes);
- mix: w·Numca + (1 − w)·Hista of the best calibrated settings of each, w chosen on dev;
- shrinkage: V = ½·R_i + ½·R̄ (own reward and group mean mixed);
- learned critic: a ridge-regression value head on the policy's last-layer hidden state of
  each state (the hidden state of its last token), trained on the train split to regress
  every token to its rollout's reward — the PPO-critic stand-in;
- MC-1 / MC-2 noise floors: for each state with continuation rewards c_1..c_K, the mean
  over every choice of 1 (or 2) continuations of |mean(chosen) − mean(remaining K−1 or
  K−2)|. They estimate the error of a 1- or 2-sample Monte Carlo estimate; their target
  (the remaining continuations) is slightly noisier than the K-sample target used for
  every other row, which inflates them a little.

Groups are evaluated whole (G = 16) and, for ``--group-sizes 16,8``, as subgroups of 8: for
each state, the response it lies in and 7 others drawn at random (seeded by prompt id).

MAE ± standard error: the standard error is clustered by prompt (the states of one group
share its responses). "closer" is the fraction of states where the method is strictly
closer to the target than the group mean; "ratio" is MAE / group-mean MAE. Beside the
ratio, the paired differences of absolute errors against the group mean and against the
½R_i+½R̄ mix, ± their standard errors clustered by prompt (negative = better): a method
beats a baseline when its difference is below −2 SE.

Example::

    nice -n 10 python -m bench.sveb.evaluate --in-process --split test --by-family
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import random
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from statevalue.calibration import clustered_mean, paired_difference  # noqa: E402
from statevalue.config import EstimatorConfig, HistaConfig, NumcaConfig  # noqa: E402

# The settings file written by calibrate.py on the dev split, read unless --calibrated-file
# names another one.
CALIBRATED_FILE = Path("bench/sveb/results/calibrated.json")
# Its keys: the parameters of each calibrated row ("name=value,..."), and the mix weight.
CALIBRATED_KEYS = (
    "numca_calibrated",
    "numca_shrunk",
    "hista_calibrated",
    "hista_relative",
    "hista_own_weight",
)


# -- data ------------------------------------------------------------------------------


def load_records(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """The JSON records of one split, in file order (complete lines only)."""
    path = data_dir / f"{split}.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run bench/sveb/generate.py first")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def parse_params(text: str) -> dict[str, str]:
    """``"a=1,b=x"`` -> {"a": "1", "b": "x"}; empty text gives {}."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected name=value, got {item!r}")
        out[name.strip()] = value.strip()
    return out


# -- method specs ----------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSpec:
    """One service method under one parameter set, shown as one row."""

    label: str
    method: str
    numca: NumcaConfig = field(default_factory=NumcaConfig)
    hista: HistaConfig = field(default_factory=HistaConfig)

    def config(self) -> EstimatorConfig:
        return EstimatorConfig(numca=self.numca, hista=self.hista)

    def client_params(self) -> dict[str, dict[str, Any]]:
        """Explicit parameters for the gRPC client (every field, so defaults cannot drift)."""
        if self.method == "numca":
            return {"numca": self.numca.model_dump()}
        if self.method == "hista":
            hista = self.hista.model_dump()
            if hista["relative_d_min"] > 0:
                del hista["d_min"]  # an explicit d_min would select the absolute clamp
            return {"hista": hista}
        return {}


# Further keys: the mix weight (null when the mix did not beat both on dev) and which
# calibrated row of each method was best on dev (the rows held to the targets).
CHOICE_KEYS = ("mix_weight", "best_numca", "best_hista")
# The targets on test: MAE / group-mean MAE at most this.
TARGET_RATIOS = {"hista": 0.8, "numca": 0.85}

# Row label of the trivial mix V = ½·R_i + ½·R̄, the bar every estimator must clear.
MIX_LABEL = "shrinkage ½R_i+½R̄"
# Row labels of the calibrated settings, by settings-file key.
CALIBRATED_LABELS = {
    "numca_calibrated": "numca calibrated",
    "numca_shrunk": "numca calibrated + shrinkage",
    "hista_calibrated": "hista calibrated",
    "hista_relative": "hista calibrated, relative d_min",
    "hista_own_weight": "hista calibrated + own_weight",
}


def engine_specs(calibrated: dict[str, str]) -> list[EngineSpec]:
    """The service rows of the table: reference settings, then every calibrated setting."""
    specs = [
        EngineSpec("group mean", "group_mean"),
        EngineSpec("numca digits (ref)", "numca", numca=NumcaConfig.reference()),
        EngineSpec(
            "numca decimal (ref)", "numca", numca=NumcaConfig.reference(number_pattern="decimal")
        ),
        EngineSpec("hista (ref)", "hista", hista=HistaConfig.reference()),
    ]
    for key in CALIBRATED_KEYS:
        params = parse_params(calibrated[key])
        label = CALIBRATED_LABELS[key]
        # On top of the reference rule: a setting names every option it turns on.
        if key.startswith("numca"):
            specs.append(EngineSpec(label, "numca", numca=NumcaConfig.reference(**params)))
        else:
            specs.append(EngineSpec(label, "hista", hista=HistaConfig.reference(**params)))
    return specs


def best_spec(specs: Sequence[EngineSpec], method: str, key: str) -> EngineSpec:
    """The calibrated spec of ``method`` named by settings-file ``key``."""
    label = CALIBRATED_LABELS[key]
    return next(s for s in specs if s.method == method and s.label == label)


def group_views(
    record: dict[str, Any], hidden: list[torch.Tensor] | None, group_size: int
) -> list[tuple[dict[str, Any], list[torch.Tensor] | None, list[dict[str, Any]]]]:
    """(group, its hidden states, its states) to evaluate ``record`` at ``group_size``.

    The whole group when ``group_size`` is its size; otherwise one subgroup per state: the
    state's response and ``group_size`` − 1 others drawn with a generator seeded by the
    prompt id, in their original order. Hidden states of a causal model do not depend on
    the other rollouts, so the subgroup reuses the whole group's.
    """
    size = len(record["responses"])
    if group_size >= size:
        return [(record, hidden, record["states"])]
    rng = random.Random(f"{record['id']}-G{group_size}")
    views = []
    for state in record["states"]:
        own = state["response"]
        others = rng.sample([j for j in range(size) if j != own], group_size - 1)
        chosen = sorted([own, *others])
        sub = {
            **record,
            "responses": [record["responses"][j] for j in chosen],
            "rewards": [record["rewards"][j] for j in chosen],
        }
        sub_hidden = None if hidden is None else [hidden[j] for j in chosen]
        views.append((sub, sub_hidden, [{**state, "response": chosen.index(own)}]))
    return views


# -- value sources ---------------------------------------------------------------------


def group_hidden(backend: Any, record: dict[str, Any]) -> list[torch.Tensor]:
    """Hidden states (the backend's layer) of prompt+response of every rollout of a group."""
    prompt = np.asarray(record["prompt_ids"], dtype=np.int64)
    return backend.hidden_states(
        [
            np.concatenate([prompt, np.asarray(r["ids"], dtype=np.int64)])
            for r in record["responses"]
        ]
    )


class InProcessSource:
    """Engine + TorchBackend in this process; hidden states computed once per group."""

    def __init__(self, backend: Any) -> None:
        from statevalue.engine import Engine

        self.backend = backend
        self.engine = Engine(backend)

    def group_input(self, record: dict[str, Any]) -> Any:
        from statevalue.schema import GroupInput, RolloutInput

        return GroupInput(
            group_id=record["id"],
            prompt_ids=np.asarray(record["prompt_ids"], dtype=np.int64),
            rollouts=[
                RolloutInput(response_ids=np.asarray(r["ids"], dtype=np.int64), reward=r["reward"])
                for r in record["responses"]
            ],
        )

    def values(
        self, record: dict[str, Any], specs: Sequence[EngineSpec], hidden: list[torch.Tensor]
    ) -> dict[str, list[np.ndarray]]:
        """Per spec label: the value arrays of every response."""
        from statevalue.engine import PreparedRequest
        from statevalue.schema import EstimateRequest

        prepared = self.engine.prepare(
            EstimateRequest(groups=[self.group_input(record)], methods=("group_mean",))
        )
        out = {}
        for spec in specs:
            request = PreparedRequest(
                groups=prepared.groups, methods=(spec.method,), config=spec.config()
            )
            result = self.engine.compute(request, hidden)
            out[spec.label] = [r.values[spec.method] for r in result.groups[0].rollouts]
        return out


class ClientSource:
    """The public gRPC client against a running server."""

    def __init__(self, target: str) -> None:
        from statevalue_client import ValueClient

        self.client = ValueClient(target, timeout=300.0)

    def values(
        self, record: dict[str, Any], specs: Sequence[EngineSpec], hidden: Any = None
    ) -> dict[str, list[np.ndarray]]:
        from statevalue_client import Group, Rollout

        group = Group(
            group_id=record["id"],
            prompt_ids=record["prompt_ids"],
            rollouts=[
                Rollout(response_ids=r["ids"], reward=r["reward"]) for r in record["responses"]
            ],
        )
        out = {}
        for spec in specs:
            result = self.client.estimate([group], methods=[spec.method], **spec.client_params())
            out[spec.label] = [r.values[spec.method] for r in result.groups[0].rollouts]
        return out


# -- learned critic --------------------------------------------------------------------


def state_features(hidden: torch.Tensor, prompt_len: int, length: int) -> torch.Tensor:
    """Hidden state of the last token of each state prompt + response[:t], t = 0..length-1."""
    return hidden[prompt_len - 1 : prompt_len - 1 + length]


class RidgeCritic:
    """A linear value head on standardised hidden states, fitted in closed form (ridge).

    Sufficient statistics are accumulated group by group, so the training set never has to
    sit in memory at once. The ridge strength is picked on a held-out fifth of the train
    prompts, then the head is refitted on all of them. Predictions are clipped to [0, 1].
    """

    LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.weight: np.ndarray | None = None
        self.bias = 0.0
        self.lam = 0.0

    @staticmethod
    def _solve(
        stats: dict[str, Any], lam: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        n = stats["n"]
        mean = stats["sx"] / n
        ybar = stats["sy"] / n
        cov = stats["xx"] / n - np.outer(mean, mean)
        cxy = stats["xy"] / n - mean * ybar
        scale = np.sqrt(np.clip(np.diag(cov), 1e-12, None))
        cov_s = cov / np.outer(scale, scale)
        w_s = np.linalg.solve(cov_s + lam * np.eye(len(scale)), cxy / scale)
        return mean, scale, w_s / scale, ybar

    @staticmethod
    def _accumulate(stats: dict[str, Any], x: np.ndarray, y: np.ndarray) -> None:
        stats["n"] += len(y)
        stats["sx"] += x.sum(0)
        stats["sy"] += y.sum()
        stats["xx"] += x.T @ x
        stats["xy"] += x.T @ y

    def fit(self, groups: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Fit on (features (n, H), targets (n,)) per prompt."""
        dim = groups[0][0].shape[1]

        def empty() -> dict[str, Any]:
            return {
                "n": 0,
                "sx": np.zeros(dim),
                "sy": 0.0,
                "xx": np.zeros((dim, dim)),
                "xy": np.zeros(dim),
            }

        fit_stats, all_stats = empty(), empty()
        held_out = []
        for index, (x, y) in enumerate(groups):
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            self._accumulate(all_stats, x64, y64)
            if index % 5 == 4:
                held_out.append((x64, y64))
            else:
                self._accumulate(fit_stats, x64, y64)
        best = (np.inf, self.LAMBDAS[0])
        if held_out and fit_stats["n"]:
            for lam in self.LAMBDAS:
                mean, _, weight, ybar = self._solve(fit_stats, lam)
                err = np.mean(
                    [
                        np.abs(np.clip((x - mean) @ weight + ybar, 0, 1) - y).mean()
                        for x, y in held_out
                    ]
                )
                best = min(best, (float(err), lam))
        self.lam = best[1]
        self.mean, self.scale, self.weight, self.bias = self._solve(all_stats, self.lam)

    def predict(self, x: np.ndarray) -> np.ndarray:
        assert self.mean is not None and self.weight is not None
        return np.clip((x.astype(np.float64) - self.mean) @ self.weight + self.bias, 0.0, 1.0)


def train_critic(backend: Any, records: Sequence[dict[str, Any]], progress: bool) -> RidgeCritic:
    """Fit the ridge critic on every token of every train rollout (target: its reward)."""
    from tqdm import tqdm

    groups = []
    for record in tqdm(records, desc="critic features", disable=not progress):
        prompt_len = len(record["prompt_ids"])
        hidden = group_hidden(backend, record)
        xs, ys = [], []
        for h, r in zip(hidden, record["responses"], strict=True):
            xs.append(state_features(h, prompt_len, len(r["ids"])).cpu().numpy())
            ys.append(np.full(len(r["ids"]), r["reward"]))
        groups.append((np.concatenate(xs), np.concatenate(ys)))
    critic = RidgeCritic()
    critic.fit(groups)
    return critic


# -- metrics ---------------------------------------------------------------------------


def mc_floor_errors(rewards: Sequence[float], samples: int) -> float:
    """Mean over every choice of ``samples`` continuations of |their mean − the others' mean|.

    NaN when fewer than ``samples`` + 1 continuations exist.
    """
    c = np.asarray(rewards, dtype=np.float64)
    if samples >= len(c):
        return float("nan")  # nothing left to compare with
    errors = []
    for chosen in itertools.combinations(range(len(c)), samples):
        rest = np.delete(c, chosen)
        errors.append(abs(c[list(chosen)].mean() - rest.mean()))
    return float(np.mean(errors))


@dataclass
class StateRow:
    """One benchmark state: where it is, its target, and every method's estimate or error."""

    prompt: str
    family: str
    target: float
    estimates: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)


def paired_text(errors: np.ndarray, base: np.ndarray | None, clusters: Sequence[str]) -> str:
    """``errors − base`` as "+0.0000 ± 0.0000"; "—" without a base or against itself."""
    if base is None or np.array_equal(errors, base):
        return "—"
    diff, se = paired_difference(errors, base, clusters)
    return f"{diff:+.4f} ± {se:.4f}"


def ratio_text(mae: float, reference: float) -> str:
    """MAE / reference MAE to three decimals; "—" when the reference is exactly right."""
    return f"{mae / reference:.3f}" if reference > 0 else "—"


def summary_table(rows: Sequence[StateRow], methods: Sequence[str], floors: Sequence[str]) -> str:
    """Markdown table: MAE ± SE, ratio to group mean, paired differences (the method's
    absolute error minus the group mean's, and minus the ½R_i+½R̄ mix's, ± SE clustered by
    prompt, negative = better), fraction closer than group mean."""
    clusters = [r.prompt for r in rows]
    targets = np.array([r.target for r in rows])

    def errors(method: str) -> np.ndarray:
        return np.abs(np.array([r.estimates[method] for r in rows]) - targets)

    gm_err = errors("group mean")
    gm_mae = gm_err.mean()
    mix_err = errors(MIX_LABEL) if MIX_LABEL in rows[0].estimates else None
    lines = [
        "| method | MAE ± SE | ratio to group mean | − group mean ± SE | − ½R_i+½R̄ ± SE "
        "| closer than group mean | ties |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        err = errors(method)
        mae, se = clustered_mean(err, clusters)
        closer = float(np.mean(err < gm_err - 1e-9))
        ties = float(np.mean(np.abs(err - gm_err) <= 1e-9))
        lines.append(
            f"| {method} | {mae:.4f} ± {se:.4f} | {ratio_text(mae, gm_mae)} "
            f"| {paired_text(err, gm_err, clusters)} | {paired_text(err, mix_err, clusters)} "
            f"| {closer:.2f} | {ties:.2f} |"
        )
    for name in floors:
        err = np.array([r.floors[name] for r in rows])
        mae, se = clustered_mean(err, clusters)
        lines.append(
            f"| {name} | {mae:.4f} ± {se:.4f} | {ratio_text(mae, gm_mae)} | — | — | — | — |"
        )
    return "\n".join(lines)


def family_table(rows: Sequence[StateRow], methods: Sequence[str], floors: Sequence[str]) -> str:
    """Markdown table: MAE per family (columns) and method (rows), with state counts."""
    families = sorted({r.family for r in rows})
    by_family = {f: [r for r in rows if r.family == f] for f in families}
    header = "| method | " + " | ".join(f"{f} (n={len(by_family[f])})" for f in families) + " |"
    lines = [header, "|---|" + "---|" * len(families)]

    def mae(subset: Sequence[StateRow], get: Callable[[StateRow], float]) -> str:
        return f"{np.mean([get(r) for r in subset]):.3f}"

    for method in methods:
        cells = [
            mae(by_family[f], lambda r, m=method: abs(r.estimates[m] - r.target)) for f in families
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for name in floors:
        cells = [mae(by_family[f], lambda r, n=name: r.floors[n]) for f in families]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def data_summary(records: Sequence[dict[str, Any]], rows: Sequence[StateRow]) -> str:
    """One paragraph on the evaluated set."""
    lengths = [len(r["ids"]) for rec in records for r in rec["responses"]]
    passes = [np.mean(rec["rewards"]) for rec in records]
    mixed = np.mean([0 < p < 1 for p in passes])
    first = records[0]
    ks = {len(s["continuation_rewards"]) for rec in records for s in rec["states"]}
    return (
        f"{len(records)} prompts, {len(rows)} states; "
        f"generated with G = {len(first['responses'])}, "
        f"K = {','.join(map(str, sorted(ks)))}, temperature {first['temperature']}, "
        f"max_new_tokens {first['max_new_tokens']}; mean pass rate {np.mean(passes):.3f} "
        f"(prompts with mixed rewards {mixed:.2f}); response length mean {np.mean(lengths):.1f}, "
        f"median {np.median(lengths):.0f}; mean target {np.mean([r.target for r in rows]):.3f}"
    )


def target_lines(rows: Sequence[StateRow], calibrated: dict[str, Any]) -> str:
    """Markdown list: the dev-chosen Numca and Hista rows against the targets."""
    targets = np.array([r.target for r in rows])

    def mae(label: str) -> float:
        return float(np.mean(np.abs(np.array([r.estimates[label] for r in rows]) - targets)))

    reference = mae("group mean")
    lines = []
    for method, limit in TARGET_RATIOS.items():
        label = CALIBRATED_LABELS[calibrated[f"best_{method}"]]
        ratio = mae(label) / reference if reference > 0 else float("nan")
        verdict = "met" if ratio <= limit else "missed"
        lines.append(f"- {method} ≤ {limit} × group mean: {verdict} ({label}: {ratio:.3f} ×)")
    hista = CALIBRATED_LABELS[calibrated["best_hista"]]
    floor = float(np.mean([r.floors["MC-2 floor"] for r in rows]))
    verdict = "met" if mae(hista) < floor else "missed"
    lines.append(f"- hista below the MC-2 floor: {verdict} ({mae(hista):.4f} vs {floor:.4f})")
    return "\n".join(lines)


def header(device: str) -> str:
    """Machine, date and the exact command."""
    # Module form, so the line holds no path of the machine it ran on.
    module = f"bench.sveb.{Path(sys.argv[0]).stem}"
    command = " ".join(["python", "-m", module, *(shlex.quote(a) for a in sys.argv[1:])])
    return (
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"device {device}\n"
        f"- command: `{command}`"
    )


# -- main ------------------------------------------------------------------------------


def evaluate(
    records: Sequence[dict[str, Any]],
    source: Any,
    specs: Sequence[EngineSpec],
    mix: tuple[float, EngineSpec, EngineSpec] | None,
    backend: Any,
    critic: RidgeCritic | None,
    group_sizes: Sequence[int],
    progress: bool,
) -> dict[int, list[StateRow]]:
    """Per group size: one StateRow per benchmark state of ``records``, groups cut to it.

    Hidden states are computed once per group and shared by every group size. ``mix`` =
    (w, numca spec, hista spec) adds the row w·numca + (1 − w)·hista.
    """
    from tqdm import tqdm

    by_size: dict[int, list[StateRow]] = {size: [] for size in group_sizes}
    for record in tqdm(records, desc="groups", disable=not progress):
        if not record["states"]:
            continue
        hidden = group_hidden(backend, record) if backend is not None else None
        views = [(size, view) for size in group_sizes for view in group_views(record, hidden, size)]
        for group_size, (group, group_hidden_, states) in views:
            rows = by_size[group_size]
            values = source.values(group, specs, group_hidden_)
            rewards = np.asarray(group["rewards"], dtype=np.float64)
            prompt_len = len(group["prompt_ids"])
            for state in states:
                i, t = state["response"], state["t"]
                row = StateRow(prompt=record["id"], family=record["family"], target=state["target"])
                for label, arrays in values.items():
                    row.estimates[label] = float(arrays[i][t])
                if mix is not None:
                    weight, numca, hista = mix
                    row.estimates[f"mix {weight:g}·numca + {1 - weight:g}·hista"] = (
                        weight * row.estimates[numca.label]
                        + (1 - weight) * row.estimates[hista.label]
                    )
                row.estimates[MIX_LABEL] = 0.5 * rewards[i] + 0.5 * rewards.mean()
                if critic is not None and group_hidden_ is not None:
                    feature = group_hidden_[i][prompt_len - 1 + t].cpu().numpy()[None]
                    row.estimates["learned critic (ridge)"] = float(critic.predict(feature)[0])
                row.floors["MC-1 floor"] = mc_floor_errors(state["continuation_rewards"], 1)
                row.floors["MC-2 floor"] = mc_floor_errors(state["continuation_rewards"], 2)
                rows.append(row)
    return by_size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="host:port of a running statevalue gRPC server")
    where.add_argument("--in-process", action="store_true", help="Engine + TorchBackend here")
    parser.add_argument("--data-dir", type=Path, default=Path("bench/sveb/data"))
    parser.add_argument("--split", default="test", help="dev, test, or both: dev,test")
    add_backend_arguments(parser, "TorchBackend model (in-process)")
    parser.add_argument(
        "--calibrated-file",
        type=Path,
        default=CALIBRATED_FILE,
        help="JSON written by bench/sveb/calibrate.py --write (default: %(default)s)",
    )
    parser.add_argument(
        "--group-sizes",
        default="16,8",
        help="group sizes to evaluate, each a table; smaller ones are subgroups (%(default)s)",
    )
    parser.add_argument("--no-critic", action="store_true", help="skip the learned critic")
    parser.add_argument("--by-family", action="store_true", help="per-family MAE table")
    parser.add_argument("--limit", type=int, default=0, help="first N prompts only (0: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    if not splits or any(s not in ("dev", "test") for s in splits):
        parser.error("--split must be dev, test or dev,test")
    args.splits = splits
    try:
        args.group_size_list = [int(g) for g in args.group_sizes.split(",") if g.strip()]
    except ValueError:
        parser.error("--group-sizes must be integers, e.g. 16,8")
    if not args.group_size_list or min(args.group_size_list) < 1:
        parser.error("--group-sizes must be integers >= 1, e.g. 16,8")
    if not args.calibrated_file.exists():
        parser.error(f"{args.calibrated_file} does not exist: run bench/sveb/calibrate.py --write")
    args.calibrated = json.loads(args.calibrated_file.read_text())
    missing = [k for k in (*CALIBRATED_KEYS, *CHOICE_KEYS) if k not in args.calibrated]
    if missing:
        parser.error(f"{args.calibrated_file} lacks {', '.join(missing)}: rerun calibrate.py")
    return args


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Run the benchmark and print its tables; returns the process exit status.

    ``backend`` reuses an already loaded TorchBackend (tests) instead of loading ``--model``.
    """
    args = parse_args(argv)
    apply_threads(args)
    specs = engine_specs(args.calibrated)
    weight = args.calibrated["mix_weight"]
    mix = None
    if weight is not None:
        mix = (
            float(weight),
            best_spec(specs, "numca", args.calibrated["best_numca"]),
            best_spec(specs, "hista", args.calibrated["best_hista"]),
        )
    need_model = args.in_process or not args.no_critic
    if need_model and backend is None:
        from statevalue.backends.torch_backend import TorchBackend

        backend = TorchBackend(args.model, device=args.device)
    source: Any = InProcessSource(backend) if args.in_process else ClientSource(args.target)
    critic = None
    if not args.no_critic:
        train = load_records(args.data_dir, "train")
        critic = train_critic(backend, train, not args.quiet)
    device = str(backend.device) if backend is not None else f"server {args.target}"
    for split in args.splits:
        records = load_records(args.data_dir, split)
        if args.limit:
            records = records[: args.limit]
        by_size = evaluate(
            records, source, specs, mix, backend, critic, args.group_size_list, not args.quiet
        )
        for group_size, rows in by_size.items():
            if not rows:
                raise SystemExit(f"no states in split {split!r}")
            methods = list(rows[0].estimates)
            floors = list(rows[0].floors)
            size = min(group_size, len(records[0]["responses"]))
            print(f"## SVEB accuracy — split {split}, G = {size}\n")
            print(header(device))
            print(f"- data: {data_summary(records, rows)}")
            print(f"- settings calibrated on dev ({args.calibrated_file.name}):")
            for key in CALIBRATED_KEYS:
                print(f"  - {CALIBRATED_LABELS[key]}: `{args.calibrated[key]}`")
            if mix is not None:
                print(f"  - mix: w = {mix[0]:g} of {mix[1].label!r} and {mix[2].label!r}")
            if critic is not None:
                print(f"- learned critic: ridge on last-layer hidden states, λ = {critic.lam:g}")
            print()
            print(summary_table(rows, methods, floors))
            print("\nTargets, with the calibrated rows that were best on dev:\n")
            print(target_lines(rows, args.calibrated))
            if args.by_family:
                print("\nMAE by family:\n")
                print(family_table(rows, methods, floors))
            print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
