"""The suite's own rules: optional stacks fail in CI, committed test data is what its
generator says it is."""

from __future__ import annotations

import json

import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from tests.conftest import ANSWER, APPLES, SAMPLED_GROUP, import_or_skip, last_number_reward


def test_a_missing_optional_stack_skips_here_and_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        import_or_skip("statevalue_no_such_stack")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ModuleNotFoundError):
        import_or_skip("statevalue_no_such_stack")


def test_the_sampled_group_is_the_embedded_models_answers_with_their_rewards(
    engine: Engine, backend: TorchBackend
) -> None:
    data = json.loads(SAMPLED_GROUP.read_text())
    assert data["model"] == backend.identity.name and data["prompt"] == APPLES
    prompt = engine.token_text.encode_chat([{"role": "user", "content": APPLES}])
    assert data["prompt_ids"] == [int(i) for i in prompt]
    rewards = []
    for rollout in data["rollouts"]:
        assert 0 < len(rollout["response_ids"]) <= data["max_new_tokens"]
        text = engine.token_text.decode_with_offsets(rollout["response_ids"])[0]
        assert rollout["reward"] == last_number_reward(text, ANSWER)
        rewards.append(rollout["reward"])
    assert 0 < sum(rewards) < len(rewards)
