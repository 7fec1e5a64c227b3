"""Calibration on a user's own rollouts: Monte Carlo targets and a grid of settings.

``statevalue calibrate`` samples states (response i, position t) from groups of rollouts,
rolls out K continuations from each with the policy model and scores them with the
user's reward function: the state's target is their mean reward. Every method and a small
grid of settings then values the same states — hidden states computed once per group,
only the estimators re-run — and the mean absolute error (MAE) of each against the
targets, with standard errors clustered by prompt, says which settings fit these rollouts.

The statistics and the state sampling are pure functions; :class:`WorkFile` keeps each
finished state's continuation rewards, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from statevalue.backends.base import ModelBackend
from statevalue.config import (
    EstimatorConfig,
    HistaConfig,
    Method,
    NumcaConfig,
    changed_fields,
)
from statevalue.engine import Engine, PreparedGroup, PreparedRequest
from statevalue.schema import EstimateRequest, GroupInput, InvalidRequest

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

RewardFunction = Callable[[str, str], float]


# -- statistics ------------------------------------------------------------------------


def clustered_mean(values: np.ndarray, clusters: Sequence[str]) -> tuple[float, float]:
    """Mean of ``values`` and its standard error clustered by ``clusters`` (ratio estimator).

    Values of one cluster (the states of one prompt, which share its responses) count as
    one draw: SE = sqrt(G / (G − 1) · Σ_g (s_g − n_g·mean)²) / n over G clusters with sums
    s_g and sizes n_g. NaN with fewer than two clusters.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    keys = sorted(set(clusters))
    if len(keys) < 2:
        return mean, float("nan")
    index = {k: i for i, k in enumerate(keys)}
    ids = np.array([index[c] for c in clusters])
    sums = np.bincount(ids, weights=values, minlength=len(keys))
    counts = np.bincount(ids, minlength=len(keys))
    resid = sums - counts * mean
    se = np.sqrt((resid**2).sum() * len(keys) / (len(keys) - 1)) / len(values)
    return mean, float(se)


def paired_difference(
    errors: np.ndarray, base: np.ndarray, clusters: Sequence[str]
) -> tuple[float, float]:
    """Mean of ``errors − base`` (the same states under two estimators) and its clustered
    standard error: much smaller than either MAE's, as both share each state's noise."""
    return clustered_mean(np.asarray(errors) - np.asarray(base), clusters)


# -- the reward function and the groups --------------------------------------------------


def load_reward(spec: str) -> RewardFunction:
    """``module:function`` -> the function; the current directory is searched first.

    Raises:
        ValueError: the spec is malformed, the module does not import or has no such
            callable.
    """
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"--reward expects module:function, got {spec!r}")
    # As `python -m` does: a reward module next to the user's data imports.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--reward {spec}: cannot import {module_name}: {exc}") from exc
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec}: {module_name} has no function {name!r}")
    return function


def prompt_text(group: GroupInput, prepared: PreparedGroup, decode: Callable[..., str]) -> str:
    """The prompt as the reward function sees it: ``prompt_text`` as given, the content
    of the last user message of ``messages``, or the decoded ``prompt_ids``."""
    if group.prompt_text is not None:
        return group.prompt_text
    if group.messages:
        users = [m["content"] for m in group.messages if m.get("role") == "user"]
        return users[-1] if users else group.messages[-1]["content"]
    return decode(prepared.prompt_ids.tolist(), skip_special_tokens=True)


# -- states ------------------------------------------------------------------------------


@dataclass(frozen=True)
class State:
    """A state to value: response ``response`` of group ``group`` (index in the file)
    before token ``t``, and the seed of its continuations."""

    group: int
    key: str
    response: int
    t: int
    seed: int

    @property
    def work_key(self) -> tuple[str, int, int]:
        """What identifies the state in the work file: the group's content, i and t."""
        return self.key, self.response, self.t


def sample_states(
    group: PreparedGroup, index: int, key: str, per_group: int, seed: int
) -> list[State]:
    """Up to ``per_group`` states of one group, drawn without replacement.

    A state is a rewarded response i (the ½-mix baseline needs its reward) with at least
    two tokens and a position 0 < t < len: t = 0 is the prompt alone, the same for every
    response, and t = len is terminal. The draw depends only on ``seed`` and ``key`` (the
    group's content), so a rerun draws the same states whatever the other groups.
    """
    rng = random.Random(f"{seed}:{key}")
    eligible = [
        i for i, response in enumerate(group.responses) if group.rewarded[i] and len(response) >= 2
    ]
    states = []
    for i in rng.sample(eligible, min(per_group, len(eligible))):
        t = rng.randint(1, len(group.responses[i]) - 1)
        states.append(State(index, key, i, t, rng.randrange(2**31)))
    return states


# -- Monte Carlo targets -----------------------------------------------------------------


class WorkFile:
    """JSON lines: a header with the run's settings, then one line per finished state.

    A rerun with the same settings skips the states already there; other settings (another
    model, K, temperature, ...) would mix incomparable targets, so they are refused.
    """

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.done: dict[tuple[str, int, int], list[float]] = {}
        if path.exists() and path.stat().st_size:
            self._read()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings}) + "\n")

    def _read(self) -> None:
        text = self.path.read_text()
        lines = text.splitlines()
        try:
            header = json.loads(lines[0])["settings"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"work file {self.path}: not a calibration work file") from exc
        differ = [name for name in self.settings if header.get(name) != self.settings[name]]
        if differ:
            shown = ", ".join(
                f"{name} {header.get(name)!r} there, {self.settings[name]!r} now" for name in differ
            )
            raise ValueError(
                f"work file {self.path} was made with other settings ({shown}); "
                "rerun with those, or give another --work file"
            )
        for line in lines[1:]:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted run: that state runs again
            self.done[(item["group"], item["response"], item["t"])] = item["rewards"]
        if not text.endswith("\n"):
            # The next record starts on a line of its own, after the cut one.
            with self.path.open("a") as handle:
                handle.write("\n")

    def add(self, state: State, rewards: Sequence[float], lengths: Sequence[int]) -> None:
        """Record a finished state (flushed at once, so an interruption loses at most it)."""
        item = {
            "group": state.key,
            "response": state.response,
            "t": state.t,
            "rewards": [float(r) for r in rewards],
            "lengths": [int(n) for n in lengths],
        }
        with self.path.open("a") as handle:
            handle.write(json.dumps(item) + "\n")
        self.done[state.work_key] = item["rewards"]


def continuation_rewards(
    backend: Any,
    group: PreparedGroup,
    prompt: str,
    state: State,
    reward: RewardFunction,
    *,
    samples: int,
    max_new_tokens: int,
    temperature: float,
) -> tuple[list[float], list[int]]:
    """Roll out ``samples`` continuations of one state and score each whole response.

    A continuation may add ``max_new_tokens − t`` tokens (at least one), so prefix and
    continuation together respect the length limit the rollouts were sampled with.
    Returns (rewards, continuation lengths).
    """
    prefix = group.responses[state.response][: state.t]
    continuations = backend.generate(
        np.concatenate([group.prompt_ids, prefix]),
        samples,
        max_new_tokens=max(1, max_new_tokens - state.t),
        temperature=temperature,
        seed=state.seed,
    )
    texts = [
        backend.tokenizer.decode(np.concatenate([prefix, c]).tolist(), skip_special_tokens=True)
        for c in continuations
    ]
    return [float(reward(prompt, text)) for text in texts], [len(c) for c in continuations]


# -- candidates and their errors ---------------------------------------------------------


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
    """Group mean, then Numca and Hista: the defaults, the reference settings, the grid.

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
    order = {"group_mean": 0, "mix": 1, "numca": 2, "hista": 3}
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


def beats(difference: tuple[float, float]) -> bool:
    """A paired difference of errors below zero by more than two standard errors."""
    mean, se = difference
    return bool(mean < -2 * se)


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


# -- the whole run -----------------------------------------------------------------------


@dataclass(frozen=True)
class MonteCarlo:
    """How states are drawn and rolled out; recorded in the work file's header.

    ``max_new_tokens`` is the response length limit the rollouts were sampled with (None:
    the longest response given); ``samples`` is K, the continuations per state.
    """

    states_per_group: int = 2
    samples: int = 8
    max_new_tokens: int | None = None
    temperature: float = 1.0
    seed: int = 0


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
        if not any(beats(row.vs_mix) for row in self.best.values()):
            out.append(
                "No candidate beats the trivial ½ own reward + ½ group mean by more than two "
                "paired standard errors: on these rollouts the gain of the estimators cannot "
                "be told from noise. More groups, states (--states-per-group) or "
                "continuations (--mc) narrow the errors."
            )
        return "\n".join(out)


def prepare_groups(
    engine: Engine, groups: Sequence[GroupInput], names: Sequence[str]
) -> list[PreparedGroup]:
    """Every group checked and tokenised as the server would; ``names[g]`` (e.g. file:line)
    is shown in an error.

    The ``prompt_id`` is dropped: each group's Numca table holds that group alone, so a
    state's value does not depend on the order of the file.
    """
    prepared = []
    for group, name in zip(groups, names, strict=True):
        try:
            one = engine.prepare(EstimateRequest(groups=[group], methods=("group_mean",)))
        except InvalidRequest as exc:
            field = exc.field.partition(".")[2] or "group"
            raise ValueError(f"{name}: {field}: {exc.message}") from exc
        prepared.append(dataclasses.replace(one.groups[0], prompt_id=None))
    return prepared


def reward_agreement(
    groups: Sequence[PreparedGroup], prompts: Sequence[str], reward: RewardFunction, decode: Any
) -> float:
    """The share of rewarded rollouts whose reward the function reproduces (to 1e-6)."""
    agree = total = 0
    for group, prompt in zip(groups, prompts, strict=True):
        for response, value, rewarded in zip(
            group.responses, group.rewards, group.rewarded, strict=True
        ):
            if rewarded:
                text = decode(response.tolist(), skip_special_tokens=True)
                agree += abs(float(reward(prompt, text)) - float(value)) <= 1e-6
                total += 1
    return agree / total if total else float("nan")


def calibrate(
    backend: ModelBackend,
    groups: Sequence[GroupInput],
    names: Sequence[str],
    reward: tuple[str, RewardFunction],
    work_path: Path,
    monte_carlo: MonteCarlo,
    *,
    budget: int | None = None,
    progress: bool = True,
) -> Report:
    """Run the missing Monte Carlo targets (at most ``budget`` states this time) and, once
    every state has one, score every candidate setting.

    ``names[g]`` names group g in errors (e.g. file:line); ``reward`` is the reward
    function and its ``module:function`` name, kept in the work file with the model and
    ``monte_carlo``. ``backend`` must be able to ``generate`` (the torch backend can).
    """
    from tqdm import tqdm

    engine = Engine(backend)
    decode = backend.tokenizer.decode
    prepared = prepare_groups(engine, groups, names)
    limit = monte_carlo.max_new_tokens or max(len(r) for g in prepared for r in g.responses)
    monte_carlo = dataclasses.replace(monte_carlo, max_new_tokens=limit)
    reward_name, reward_function = reward
    identity = backend.identity
    work = WorkFile(
        work_path,
        {
            "model": f"{identity.name} {identity.version}",
            "reward": reward_name,
            **dataclasses.asdict(monte_carlo),
        },
    )
    prompts = [prompt_text(g, p, decode) for g, p in zip(groups, prepared, strict=True)]
    states = [
        state
        for index, group in enumerate(prepared)
        for state in sample_states(
            group, index, group.content_digest(), monte_carlo.states_per_group, monte_carlo.seed
        )
    ]
    if not states:
        raise ValueError("no states: a state needs a rewarded response of two or more tokens")
    todo = [s for s in states if s.work_key not in work.done]
    done_before = len(states) - len(todo)
    if budget is not None:
        todo = todo[:budget]
    with tqdm(total=len(states), initial=done_before, unit="state", disable=not progress) as bar:
        for state in todo:
            rewards, lengths = continuation_rewards(
                backend,
                prepared[state.group],
                prompts[state.group],
                state,
                reward_function,
                samples=monte_carlo.samples,
                max_new_tokens=limit,
                temperature=monte_carlo.temperature,
            )
            work.add(state, rewards, lengths)
            bar.update(1)
    report = Report(len(states), done_before, len(todo))
    if not report.complete:
        return report
    rows = candidates()
    estimates: dict[str, list[np.ndarray]] = {}
    for index, group in enumerate(tqdm(prepared, unit="group", disable=not progress)):
        own = [s for s in states if s.group == index]
        if own:
            for label, values in group_estimates(engine, group, own, rows).items():
                estimates.setdefault(label, []).append(values)
    targets = np.array([np.mean(work.done[s.work_key]) for s in states])
    report.mean_target = float(targets.mean())
    # States of one prompt share its responses; groups without a prompt_id stand alone.
    clusters = [groups[s.group].prompt_id or s.key for s in states]
    methods = {row.label: row.method for row in rows}
    report.rows = score(
        {label: np.concatenate(parts) for label, parts in estimates.items()},
        targets,
        clusters,
        methods,
    )
    report.best = best_rows(report.rows)
    config = {row.label: row.config for row in rows}
    for method, row in report.best.items():
        fields = changed_fields(config[row.label]).get(method)
        if fields:
            report.params[method] = fields
    report.reward_agreement = reward_agreement(prepared, prompts, reward_function, decode)
    return report
