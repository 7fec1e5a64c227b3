"""Self-calibration: the leave-one-rollout-out criterion, the choice it makes, and the answer
that reports it (the embedded model on a real gRPC and HTTP server)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig, HistaConfig, NumcaConfig, SelfCalibrationConfig
from statevalue.engine import Engine
from statevalue.estimators.hista import hista_values
from statevalue.estimators.self_calibration import (
    HISTA_NEIGHBOURS,
    HISTA_RELATIVE_D_MINS,
    HISTA_RELATIVE_NODE_SPACINGS,
    GroupCandidates,
    criterion_terms,
    fit_anchored_own_weights,
    fit_own_weight,
    group_mean_candidate,
    hista_candidates,
    numca_candidates,
    self_calibrate,
    target_group,
)
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import ServerThread, running_server

ENABLED = SelfCalibrationConfig(enabled=True)
HISTA_ONLY = SelfCalibrationConfig(enabled=True, combine=False, own_weight="none")
ANCHORED = SelfCalibrationConfig(enabled=True, combine=False, own_weight="anchored")


# -- the criterion on hand-computed groups -------------------------------------------------


def test_group_mean_left_out_by_hand() -> None:
    # Rewards 1, 0, 0, 1: rollout 0 is estimated by (0 + 0 + 1) / 3, and so on.
    target = target_group([2, 1, 3, 2], np.array([1.0, 0.0, 0.0, 1.0]), np.ones(4, bool))
    assert target.loo_mean == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1 / 3])
    terms = criterion_terms(group_mean_candidate(target).values, target)
    assert terms == pytest.approx([4 / 9] * 4)


def test_query_and_lone_rewarded_rollouts_do_not_count() -> None:
    # A query has no reward to compare with; the only rewarded rollout has nobody to be
    # estimated from.
    target = target_group([2, 2], np.array([1.0, 0.0]), np.array([True, False]))
    assert not target.eligible.any()
    assert criterion_terms(group_mean_candidate(target).values, target) == []


def test_numca_left_out_by_hand() -> None:
    # Tokens are single characters; "digits", no merging, the last number dropped.
    texts = ["3 5 9", "3 7 9", "4 9"]
    ends = [np.arange(1, len(t) + 1) for t in texts]
    rewards = np.array([1.0, 0.0, 1.0])
    target = target_group([len(t) for t in texts], rewards, np.ones(3, bool))
    (key, candidate), *_ = numca_candidates(texts, ends, target, NumcaConfig.reference())
    assert key == {"number_pattern": "digits", "relative_merge_distance": 0.05}
    # Rollout 0: token 0 in {} (the others' mean 0.5); a state starts after the token that
    # holds its number: {3} from token 1, where only rollout 1 (reward 0) is left; {3, 5}
    # from token 3 was reached by rollout 0 alone, so it keeps the value before it.
    np.testing.assert_allclose(candidate.values[0], [0.5, 0.0, 0.0, 0.0, 0.0])
    # Rollout 2: {} is the others' mean 0.5; {4} was reached by nobody else.
    np.testing.assert_allclose(candidate.values[2], [0.5, 0.5, 0.5])
    terms = criterion_terms(candidate.values, target)
    assert terms[0] == pytest.approx((0.25 + 4 * 1.0) / 5)
    assert terms[2] == pytest.approx(0.25)


# -- Hista's grid against Hista itself ----------------------------------------------------


def random_group(seed: int, size: int = 6) -> tuple[list[torch.Tensor], int, list[int]]:
    generator = torch.Generator().manual_seed(seed)
    prompt_len = 7
    lengths = [int(n) for n in torch.randint(20, 40, (size,), generator=generator)]
    prompt = torch.randn(prompt_len, 16, generator=generator)
    hidden = [torch.cat([prompt, torch.randn(n, 16, generator=generator)]) for n in lengths]
    return hidden, prompt_len, lengths


def test_every_grid_point_matches_hista_for_a_query() -> None:
    """A query is never a candidate, so its values are exactly Hista's at that setting."""
    hidden, prompt_len, lengths = random_group(0)
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    rewarded = np.array([True, True, True, True, True, False])
    target = target_group(lengths, rewards, rewarded)
    grid = hista_candidates(hidden, prompt_len, target, HistaConfig())
    assert len(grid) == (
        len(HISTA_RELATIVE_NODE_SPACINGS) * len(HISTA_NEIGHBOURS) * len(HISTA_RELATIVE_D_MINS)
    )
    for key, candidate in grid:
        config = HistaConfig(**key)
        expected = hista_values(hidden, prompt_len, lengths, rewards, rewarded, config)
        np.testing.assert_allclose(candidate.values[5], expected.values[5], rtol=1e-6)


def test_a_rewarded_rollout_never_sees_its_own_reward() -> None:
    hidden, prompt_len, lengths = random_group(1)
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    base = target_group(lengths, rewards, np.ones(6, bool))
    flipped = rewards.copy()
    flipped[2] = 0.0
    other = target_group(lengths, flipped, np.ones(6, bool))
    for (_, a), (_, b) in zip(
        hista_candidates(hidden, prompt_len, base, HistaConfig()),
        hista_candidates(hidden, prompt_len, other, HistaConfig()),
        strict=True,
    ):
        np.testing.assert_array_equal(a.values[2], b.values[2])


# -- the criterion picks the setting that is right ----------------------------------------


def branching_groups(count: int, seed: int) -> tuple[list[GroupCandidates], list[np.ndarray]]:
    """Groups where every rollout takes branch A (reward 1 w.p. 0.9) or B (0.1) at token
    10 and its hidden states say which from then on; the true values are known: 0.5
    before the branch, 0.9 or 0.1 after it."""
    rng = np.random.default_rng(seed)
    groups, truths = [], []
    prompt_len, length, dim = 5, 60, 8
    for _ in range(count):
        prompt = rng.normal(size=(prompt_len, dim))
        shared = rng.normal(size=(10, dim))
        branch = rng.normal(size=(2, dim)) * 5
        hidden, rewards, truth = [], [], []
        for _ in range(16):
            b = int(rng.integers(2))
            tail = branch[b] + 0.1 * rng.normal(size=(length - 10, dim))
            hidden.append(torch.tensor(np.concatenate([prompt, shared, tail]), dtype=torch.float32))
            p = 0.9 if b == 0 else 0.1
            rewards.append(float(rng.random() < p))
            truth.append(np.concatenate([np.full(10, 0.5), np.full(length - 10, p)]))
        target = target_group([length] * 16, np.array(rewards), np.ones(16, bool))
        groups.append(
            GroupCandidates(target, hista_candidates(hidden, prompt_len, target, HistaConfig()), [])
        )
        truths.append(np.stack(truth))
    return groups, truths


def test_the_criterion_picks_the_spacing_that_is_best_against_the_true_values() -> None:
    groups, truths = branching_groups(12, seed=3)
    (chosen,) = {
        m: report for m, (_, report) in self_calibrate(groups, ["hista"], HISTA_ONLY)[0].items()
    }.values()
    true_mse = {}
    for index, (key, _) in enumerate(groups[0].hista):
        errors = [
            np.mean((np.stack(g.hista[index][1].values) - truth) ** 2)
            for g, truth in zip(groups, truths, strict=True)
        ]
        true_mse[tuple(key.items())] = float(np.mean(errors))
    best = min(true_mse, key=true_mse.__getitem__)
    picked = tuple(chosen.params["hista"].items())
    # Fine spacing reaches the branch soonest: the truly best spacing, and the one picked.
    assert dict(best)["relative_node_spacing"] == min(HISTA_RELATIVE_NODE_SPACINGS)
    assert dict(picked)["relative_node_spacing"] == dict(best)["relative_node_spacing"]
    assert true_mse[picked] <= 1.05 * true_mse[best]
    assert chosen.criterion < chosen.group_mean_criterion


def test_fitted_own_weight_follows_the_identity() -> None:
    """With U = the left-out group mean, the covariance term is 0 and a = 1 − S / C."""
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    target = target_group([3] * 5, rewards, np.ones(5, bool))
    group = GroupCandidates(target, [], [])
    mean = group_mean_candidate(target)
    variance = float(np.var(rewards, ddof=1))
    criterion = float(np.mean(criterion_terms(mean.values, target)))
    assert fit_own_weight([group], [mean]) == pytest.approx(1 - variance / criterion)


def test_anchored_own_weights_by_hand() -> None:
    """Four tokens, four quarters: token t's σ² is S·(1 − (t + ½) / 4); with U the
    left-out group mean, C is the same in every quarter."""
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    target = target_group([4] * 5, rewards, np.ones(5, bool))
    mean = group_mean_candidate(target)
    variance = float(np.var(rewards, ddof=1))
    criterion = float(np.mean((target.loo_mean - rewards) ** 2))
    want = [1 - variance * (1 - (t + 0.5) / 4) / criterion for t in range(4)]
    assert fit_anchored_own_weights([GroupCandidates(target, [], [])], [mean]) == pytest.approx(
        want
    )


def revealed_groups(count: int, seed: int) -> tuple[list[GroupCandidates], list[np.ndarray]]:
    """Groups whose reward is a function of the response: 1 when at least 5 of its 8
    tokens are heads. The true value of the state after token t is known exactly."""
    rng = np.random.default_rng(seed)
    tokens, need = 8, 5
    groups, truths = [], []
    for _ in range(count):
        flips = rng.integers(0, 2, size=(16, tokens))
        rewards = (flips.sum(1) >= need).astype(float)
        heads = np.cumsum(flips, axis=1)  # after token t (the state token t ends)
        left = tokens - 1 - np.arange(tokens)
        truth = np.array(
            [
                [
                    sum(math.comb(int(r), j) for j in range(max(need - int(h), 0), int(r) + 1))
                    / 2 ** int(r)
                    for h, r in zip(row, left, strict=True)
                ]
                for row in heads
            ]
        )
        target = target_group([tokens] * 16, rewards, np.ones(16, bool))
        groups.append(GroupCandidates(target, [], []))
        truths.append(truth)
    return groups, truths


def test_anchored_weights_beat_the_covariance_weight_when_the_reward_is_revealed() -> None:
    groups, truths = revealed_groups(16, seed=7)
    means = [group_mean_candidate(g.target) for g in groups]
    anchored = np.array(fit_anchored_own_weights(groups, means))
    covariance = fit_own_weight(groups, means)
    assert np.all(np.diff(anchored) > 0)  # the later the state, the more its reward says
    assert anchored[-1] > covariance

    def true_error(weights: np.ndarray) -> float:
        errors = []
        for g, m, truth in zip(groups, means, truths, strict=True):
            a = weights[np.arange(8) * len(weights) // 8]
            values = a * g.target.rewards[:, None] + (1 - a) * np.stack(m.values)
            errors.append(np.mean((values - truth) ** 2))
        return float(np.mean(errors))

    assert true_error(anchored) < true_error(np.array([covariance]))


def test_anchored_values_and_boundaries_follow_the_quarters() -> None:
    groups, _ = branching_groups(2, seed=11)
    answer, report = self_calibrate(groups, ["hista"], ANCHORED)[0]["hista"]
    other, _ = self_calibrate(groups, ["hista"], HISTA_ONLY)[0]["hista"]
    weights = np.array(report.own_weights)
    assert len(weights) == 4
    assert report.own_weight == pytest.approx(float(np.mean(weights)))
    rewards = groups[0].target.rewards
    for i, (values, plain) in enumerate(zip(answer.values, other.values, strict=True)):
        a = weights[np.arange(len(values)) * 4 // len(values)]
        np.testing.assert_allclose(values, a * rewards[i] + (1 - a) * plain, rtol=1e-6)
        assert {15, 30, 45} <= set(answer.boundaries[i].tolist())


def test_choice_and_values_do_not_depend_on_the_order() -> None:
    groups, _ = branching_groups(3, seed=5)
    first = self_calibrate(groups, ["hista"], ENABLED)
    order = [2, 0, 1]
    second = self_calibrate([groups[g] for g in order], ["hista"], ENABLED)
    for position, g in enumerate(order):
        a, b = first[g]["hista"], second[position]["hista"]
        assert a[1] == b[1]
        for x, y in zip(a[0].values, b[0].values, strict=True):
            np.testing.assert_array_equal(x, y)


def test_choice_does_not_depend_on_the_order_of_the_rollouts() -> None:
    hidden, prompt_len, lengths = random_group(2, size=8)
    rewards = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    texts = [f"{3 * j} then {j + 1} and {j % 3}" for j in range(8)]
    ends = [np.linspace(1, len(t), n).astype(np.int64) for t, n in zip(texts, lengths, strict=True)]

    def run(order: list[int]) -> list[tuple[np.ndarray, object]]:
        target = target_group([lengths[j] for j in order], rewards[order], np.ones(8, bool))
        group = GroupCandidates(
            target,
            hista_candidates([hidden[j] for j in order], prompt_len, target, HistaConfig()),
            numca_candidates(
                [texts[j] for j in order], [ends[j] for j in order], target, NumcaConfig()
            ),
        )
        (answer,) = self_calibrate([group], ["hista", "numca"], ENABLED)
        return [(answer[m][0].values, answer[m][1]) for m in ("hista", "numca")]

    order = [5, 2, 7, 0, 3, 1, 6, 4]
    for (values, report), (shuffled, shuffled_report) in zip(
        run(list(range(8))), run(order), strict=True
    ):
        assert report == shuffled_report
        for position, j in enumerate(order):
            np.testing.assert_allclose(shuffled[position], values[j], rtol=1e-6)


# -- the engine and the servers ------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sampled_group() -> GroupInput:
    """8 responses of the embedded model with mixed rewards, from the committed SVEB set
    (sampled once, so no test here has to generate)."""
    with (ROOT / "bench/sveb/data/dev.jsonl").open() as handle:
        record = next(r for r in map(json.loads, handle) if 0 < sum(r["rewards"][:8]) < 8)
    return GroupInput(
        group_id="apples",
        prompt_ids=np.asarray(record["prompt_ids"]),
        rollouts=[
            RolloutInput(response_ids=np.asarray(r["ids"]), reward=r["reward"])
            for r in record["responses"][:8]
        ],
    )


def request(group: GroupInput, **calibration: object) -> EstimateRequest:
    return EstimateRequest(
        groups=[group],
        methods=("numca", "hista", "group_mean"),
        config=EstimatorConfig.model_validate({"self_calibration": calibration}),
    )


def test_engine_reports_the_choice_and_answers_with_it(
    engine: Engine, sampled_group: GroupInput
) -> None:
    result = engine.estimate(request(sampled_group, enabled=True))
    (group,) = result.groups
    assert set(group.self_calibration) == {"numca", "hista"}
    hista = group.self_calibration["hista"]
    assert hista.scope == "request"
    assert "hista" in hista.params and "hista" in hista.weights
    assert math.isclose(sum(hista.weights.values()), 1.0)
    assert 0.0 <= hista.own_weight <= 1.0
    assert hista.criterion <= hista.group_mean_criterion
    # The answer is the reported blend: a·R_i + (1 − a)·U, U from the other rollouts.
    rewards = np.array([r.reward for r in sampled_group.rollouts])
    last = [float(r.values["hista"][-1]) for r in group.rollouts]
    assert not np.allclose(last, rewards)  # the reference's end node would give R_i


def test_self_calibration_off_leaves_the_answer_alone(
    engine: Engine, sampled_group: GroupInput
) -> None:
    plain = engine.estimate(request(sampled_group))
    assert plain.groups[0].self_calibration == {}
    again = engine.estimate(EstimateRequest(groups=[sampled_group]))
    for a, b in zip(plain.groups[0].rollouts, again.groups[0].rollouts, strict=True):
        for method in ("numca", "hista", "group_mean"):
            np.testing.assert_array_equal(a.values[method], b.values[method])


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as running:
        yield running


@pytest.mark.slow
def test_both_front_ends_report_the_choice(
    server: ServerThread, engine: Engine, sampled_group: GroupInput
) -> None:
    expected = engine.estimate(request(sampled_group, enabled=True, scope="group"))
    choice = expected.groups[0].self_calibration["hista"]
    group = Group(
        group_id="apples",
        prompt_ids=sampled_group.prompt_ids,
        rollouts=[
            Rollout(response_ids=r.response_ids, reward=r.reward) for r in sampled_group.rollouts
        ],
    )
    params = {"self_calibration": {"enabled": True, "scope": "group"}}
    with ValueClient(server.grpc_target) as client:
        answer = client.estimate([group], methods=["hista"], **params)
    # The same choice; the fitted numbers up to the float rounding of the forward pass,
    # which the server may batch differently.
    expected_report = dataclasses.asdict(choice)
    assert_same_report(answer.groups[0].self_calibration["hista"], expected_report)
    np.testing.assert_allclose(
        answer.groups[0].rollouts[0].values["hista"],
        expected.groups[0].rollouts[0].values["hista"],
    )
    body = {
        "methods": ["hista"],
        "params": params,
        "groups": [
            {
                "prompt_ids": sampled_group.prompt_ids.tolist(),
                "rollouts": [
                    {"response_ids": r.response_ids.tolist(), "reward": r.reward}
                    for r in sampled_group.rollouts
                ],
            }
        ],
    }
    reply = httpx.post(f"{server.http_url}/v1/estimate", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert_same_report(reply.json()["groups"][0]["self_calibration"]["hista"], expected_report)


def assert_same_report(got: dict[str, object], want: dict[str, object]) -> None:
    assert set(got) == set(want)
    for name in ("params", "candidates", "scope"):
        assert got[name] == want[name], name
    assert got["weights"] == pytest.approx(want["weights"], rel=1e-6)
    for name in ("own_weight", "own_weights", "criterion", "group_mean_criterion"):
        assert got[name] == pytest.approx(want[name], rel=1e-6), name


@pytest.mark.slow
def test_the_sveb_script_prints_every_row_and_the_timing(
    backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.sveb import self_calibration as script

    argv = ["--split", "dev", "--limit", "1", "--step-size", "1", "--group-sizes", "16,4"]
    assert script.main([*argv, "--variants", "--timing", "--quiet"], backend=backend) == 0
    out = capsys.readouterr().out
    tables = out.split("## SVEB self-calibration")[1:]
    assert [t.split("\n")[0] for t in tables] == [" — split dev, G = 16", " — split dev, G = 4"]
    for table in tables:
        for label in ("hista self-calibrated, per step", "numca self-calibrated, per group"):
            row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
            assert math.isfinite(float(row.split("|")[2].split("±")[0]))
        assert "| hidden states s | estimators s | with self-calibration s |" in table
