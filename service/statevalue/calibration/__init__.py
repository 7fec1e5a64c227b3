"""Calibration on a user's own rollouts: Monte Carlo targets and a grid of settings.

``statevalue calibrate`` samples states (response i, position t) from groups of rollouts,
rolls out K continuations from each with the policy model and scores them with the
user's reward function: the state's target is their mean reward. Every method and a small
grid of settings then values the same states — hidden states computed once per group,
only the estimators re-run — and the mean absolute error (MAE) of each against the
targets, with standard errors clustered by prompt, says which settings fit these rollouts.

Modules, each using only those before it: ``statistics`` (clustered standard errors),
``monte_carlo`` (states, the reward function, continuations), ``work_file`` (finished
states, for resuming), ``grid`` (the candidate settings and their values), ``report``
(the table and the recommendation); this module runs the whole calibration.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from statevalue.backends.base import ModelBackend
from statevalue.calibration.grid import (
    SELF_CALIBRATED,
    Candidate,
    candidates,
    group_estimates,
)
from statevalue.calibration.monte_carlo import (
    MonteCarlo,
    RewardFunction,
    State,
    continuation_rewards,
    load_reward,
    prompt_text,
    sample_states,
)
from statevalue.calibration.report import Report, Row, best_rows, score, table
from statevalue.calibration.statistics import beats, clustered_mean, paired_difference
from statevalue.calibration.work_file import WorkFile
from statevalue.config import changed_fields
from statevalue.engine import Engine, PreparedGroup
from statevalue.schema import EstimateRequest, GroupInput, InvalidRequest

__all__ = [
    "Candidate",
    "MonteCarlo",
    "Report",
    "RewardFunction",
    "Row",
    "State",
    "WorkFile",
    "beats",
    "best_rows",
    "calibrate",
    "candidates",
    "clustered_mean",
    "load_reward",
    "paired_difference",
    "sample_states",
    "score",
    "table",
]


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
    methods = {
        row.label: SELF_CALIBRATED if row.config.self_calibration.enabled else row.method
        for row in rows
    }
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
