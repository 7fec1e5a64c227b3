"""The engine end to end on the real embedded model: shapes, ranges, text input, checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from statevalue.config import AdvantageConfig, EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, InvalidRequest, RolloutInput
from tests.conftest import APPLES, as_ids

ALL = ("numca", "hista", "group_mean")
# ~100-token answers leave no interior node at the reference spacing of 50 only for the
# shortest responses; a spacing of 10 gives every method several segments to work with.
SHORT = EstimatorConfig.model_validate(
    {"hista": {"node_spacing": 10, "d_min": 1.0}, "numca": {"merge_distance": 5}}
)


def test_sampled_group_all_methods(engine: Engine, sampled_group: GroupInput) -> None:
    result = engine.estimate(EstimateRequest(groups=[sampled_group], methods=ALL, config=SHORT))
    assert result.model == engine.model
    (group,) = result.groups
    rewards = np.array([r.reward for r in sampled_group.rollouts])
    mean = rewards.mean()
    differs = dict.fromkeys(ALL, False)
    for rollout_in, rollout in zip(sampled_group.rollouts, group.rollouts, strict=True):
        length = len(rollout_in.response_ids)
        for method in ALL:
            values = rollout.values[method]
            assert values.shape == (length,) and values.dtype == np.float32
            assert rollout.advantages[method].shape == (length,)
            assert rewards.min() - 1e-6 <= values.min() and values.max() <= rewards.max() + 1e-6
            assert rollout.boundaries[method][0] == 0
            differs[method] |= bool(np.abs(values - mean).max() > 1e-3)
        np.testing.assert_allclose(rollout.values["group_mean"], mean, rtol=1e-6)
    assert differs["numca"] and differs["hista"] and not differs["group_mean"]
    assert result.forward_seconds > 0 and result.estimator_seconds > 0


def test_group_mean_advantage_is_scaled_reward_minus_mean(
    engine: Engine, sampled_group: GroupInput
) -> None:
    result = engine.estimate(EstimateRequest(groups=[sampled_group], methods=("group_mean",)))
    rewards = np.array([r.reward for r in sampled_group.rollouts])
    scale = rewards.std(ddof=1) + 1e-4
    for reward, rollout in zip(rewards, result.groups[0].rollouts, strict=True):
        np.testing.assert_allclose(
            rollout.advantages["group_mean"], (reward - rewards.mean()) / scale, rtol=1e-5
        )


def test_text_input_matches_ids(engine: Engine) -> None:
    prompt = engine.token_text.encode_chat([{"role": "user", "content": APPLES}])
    texts = ["5 + 3 = 8. The answer is 8.", "5 - 3 = 2. The answer is 2.", "It is 8."]
    rewards = [1.0, 0.0, 1.0]
    by_text = GroupInput(
        messages=[{"role": "user", "content": APPLES}],
        rollouts=[
            RolloutInput(response_text=t, reward=w) for t, w in zip(texts, rewards, strict=True)
        ],
    )
    by_ids = GroupInput(
        prompt_ids=prompt,
        rollouts=[
            RolloutInput(response_ids=engine.token_text.encode_text(t), reward=w)
            for t, w in zip(texts, rewards, strict=True)
        ],
    )
    config = SHORT.model_copy(
        update={"numca": SHORT.numca.model_copy(update={"merge_distance": 0})}
    )
    a, b = (
        engine.estimate(EstimateRequest(groups=[g], methods=ALL, config=config)).groups[0]
        for g in (by_text, by_ids)
    )
    for x, y in zip(a.rollouts, b.rollouts, strict=True):
        for method in ALL:
            np.testing.assert_array_equal(x.values[method], y.values[method])
    # Numbers 5, 3, 8, 8 with the last (the answer) dropped: states {}, {5}, {5,3}, {5,3,8}.
    assert len(a.rollouts[0].boundaries["numca"]) == 4


def test_query_rollout_gets_values_and_changes_nothing(
    engine: Engine, sampled_group: GroupInput
) -> None:
    longest = max(sampled_group.rollouts, key=lambda r: len(r.response_ids))
    prefix = longest.response_ids[: len(longest.response_ids) // 2]
    query = RolloutInput(response_ids=prefix)
    with_query = dataclasses.replace(sampled_group, rollouts=[*sampled_group.rollouts, query])
    base = engine.estimate(EstimateRequest(groups=[sampled_group], config=SHORT)).groups[0]
    extended = engine.estimate(EstimateRequest(groups=[with_query], config=SHORT)).groups[0]
    for before, after in zip(base.rollouts, extended.rollouts[:-1], strict=True):
        for method in ALL:
            np.testing.assert_allclose(before.values[method], after.values[method], atol=1e-5)
    answer = extended.rollouts[-1]
    for method in ALL:
        assert answer.values[method].shape == prefix.shape
        assert np.isfinite(answer.advantages[method]).all()


def test_prompt_id_accumulates_numca_table(engine: Engine, sampled_group: GroupInput) -> None:
    keyed = dataclasses.replace(sampled_group, prompt_id="accumulate-test")
    request = EstimateRequest(groups=[keyed], methods=("numca",), config=SHORT)
    first = engine.estimate(request).groups[0]
    flipped = dataclasses.replace(
        keyed,
        group_id="apples-flipped",
        rollouts=[dataclasses.replace(r, reward=1.0 - r.reward) for r in keyed.rollouts],
    )
    second = engine.estimate(dataclasses.replace(request, groups=[flipped])).groups[0]
    # Same paths, opposite rewards: after both groups every state's mean is exactly 0.5.
    for rollout in second.rollouts:
        np.testing.assert_allclose(rollout.values["numca"], 0.5, rtol=1e-6)
    assert any(np.abs(r.values["numca"] - 0.5).max() > 1e-3 for r in first.rollouts)


def test_a_resent_group_counts_once(engine: Engine, sampled_group: GroupInput) -> None:
    keyed = dataclasses.replace(sampled_group, prompt_id="resend-test")
    request = EstimateRequest(groups=[keyed], methods=("numca",), config=SHORT)
    answers = [engine.estimate(request).groups[0] for _ in range(3)]
    for answer in answers[1:]:
        for got, first in zip(answer.rollouts, answers[0].rollouts, strict=True):
            np.testing.assert_array_equal(got.values["numca"], first.values["numca"])
    # Without a group id or key, each send is a new group: the table grows.
    anonymous = dataclasses.replace(keyed, group_id="")
    unkeyed = dataclasses.replace(request, groups=[anonymous])
    engine.estimate(unkeyed)
    engine.estimate(unkeyed)
    assert engine.numca_store.stats().counted >= 3


def test_a_reused_group_id_with_other_rewards_is_refused(
    engine: Engine, sampled_group: GroupInput
) -> None:
    keyed = dataclasses.replace(sampled_group, prompt_id="reuse-test")
    engine.estimate(EstimateRequest(groups=[keyed], methods=("numca",), config=SHORT))
    changed = dataclasses.replace(
        keyed, rollouts=[dataclasses.replace(r, reward=0.5) for r in keyed.rollouts]
    )
    other = dataclasses.replace(keyed, group_id="fresh", prompt_id="reuse-test-2")
    request = EstimateRequest(groups=[other, changed], methods=("numca",), config=SHORT)
    counted = engine.numca_store.stats().counted
    with pytest.raises(InvalidRequest) as caught:
        engine.estimate(request)
    assert caught.value.field == "groups[1].group_id"
    assert "already counted" in caught.value.message
    # The refusal wrote nothing, not even the other prompt's group.
    assert engine.numca_store.stats().counted == counted
    keyed_by_key = dataclasses.replace(other, idempotency_key="k2")
    engine.estimate(dataclasses.replace(request, groups=[keyed_by_key]))
    with pytest.raises(InvalidRequest) as caught:
        engine.estimate(
            dataclasses.replace(
                request, groups=[dataclasses.replace(keyed_by_key, rollouts=changed.rollouts)]
            )
        )
    assert caught.value.field == "groups[0].idempotency_key"


@pytest.mark.parametrize("name", ["group_id", "idempotency_key"])
def test_duplicate_ids_in_one_request_are_refused(
    engine: Engine, sampled_group: GroupInput, name: str
) -> None:
    groups = [
        dataclasses.replace(sampled_group, **{"group_id": f"g{i}", name: "same"}) for i in (0, 1)
    ]
    with pytest.raises(InvalidRequest) as caught:
        engine.estimate(EstimateRequest(groups=groups, methods=("group_mean",)))
    assert caught.value.field == f"groups[1].{name}"
    assert "'same' is also groups[0]" in caught.value.message


def test_token_gae_and_no_scaling(engine: Engine) -> None:
    config = EstimatorConfig(advantage=AdvantageConfig(gae="token", scale="none"))
    group = GroupInput(
        prompt_ids=as_ids([1, 2, 3]),
        rollouts=[
            RolloutInput(response_ids=as_ids([4, 5, 6]), reward=1.0),
            RolloutInput(response_ids=as_ids([7, 8]), reward=0.0),
        ],
    )
    result = engine.estimate(
        EstimateRequest(groups=[group], methods=("group_mean",), config=config)
    )
    np.testing.assert_allclose(result.groups[0].rollouts[0].advantages["group_mean"], [0.5] * 3)
    np.testing.assert_allclose(result.groups[0].rollouts[1].advantages["group_mean"], [-0.5] * 2)


def _group(**changes: object) -> GroupInput:
    base = GroupInput(
        prompt_ids=as_ids([1, 2, 3]),
        rollouts=[RolloutInput(response_ids=as_ids([4, 5]), reward=1.0)],
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("group", "field", "words"),
    [
        (_group(rollouts=[]), "groups[0].rollouts", "empty group"),
        (
            _group(rollouts=[RolloutInput(response_ids=as_ids([4]))]),
            "groups[0].rollouts",
            "at least one rollout with a reward",
        ),
        (
            _group(rollouts=[RolloutInput(response_ids=as_ids([4]), reward=float("nan"))]),
            "groups[0].rollouts[0].reward",
            "finite",
        ),
        (
            _group(rollouts=[RolloutInput(response_ids=as_ids([4, 49152]), reward=1.0)]),
            "groups[0].rollouts[0].response_ids",
            "outside the vocabulary",
        ),
        (_group(prompt_ids=as_ids([-1])), "groups[0].prompt_ids", "outside the vocabulary"),
        (
            _group(prompt_ids=as_ids([1] * 8191)),
            "groups[0].rollouts[0].response_ids",
            "longer than the model's context",
        ),
        (
            _group(rollouts=[RolloutInput(response_text="hi", reward=1.0)]),
            "groups[0].rollouts[0].response_ids",
            "text given where ids are required",
        ),
        (_group(prompt_ids=None), "groups[0].prompt_ids", "exactly one of"),
        (_group(prompt_text="hi"), "groups[0].prompt_ids", "exactly one of"),
        (
            _group(
                rollouts=[
                    RolloutInput(response_ids=as_ids([4, 5]), reward=1.0, token_rewards=np.zeros(3))
                ]
            ),
            "groups[0].rollouts[0].token_rewards",
            "one per response token",
        ),
        (
            _group(prompt_ids=np.array([1.5, 2.0])),
            "groups[0].prompt_ids",
            "integer token ids",
        ),
    ],
)
def test_invalid_groups_name_the_field(
    engine: Engine, group: GroupInput, field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest, match=words) as caught:
        engine.estimate(EstimateRequest(groups=[group], methods=("group_mean",)))
    assert caught.value.field == field


def test_unknown_method_and_empty_request(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="unknown method 'ppo'") as caught:
        engine.estimate(EstimateRequest(groups=[_group()], methods=("ppo",)))  # type: ignore[arg-type]
    assert caught.value.field == "methods"
    with pytest.raises(InvalidRequest, match="no groups"):
        engine.estimate(EstimateRequest(groups=[]))
