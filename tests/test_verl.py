"""verl's driver-side compute_advantage routes algorithm.adv_estimator=statevalue to the service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import APPLES, import_or_skip

import_or_skip("verl")

from verl import DataProto  # noqa: E402
from verl.experimental.separation import ray_trainer as separation_trainer  # noqa: E402
from verl.trainer.ppo import core_algos, ray_trainer  # noqa: E402

from statevalue.backends.torch_backend import TorchBackend  # noqa: E402
from statevalue.engine import Engine  # noqa: E402
from statevalue_client import Group, Rollout, ValueClient  # noqa: E402
from statevalue_client.sync import WeightSync  # noqa: E402
from statevalue_client.verl import (  # noqa: E402
    compute_statevalue_advantage,
    install_statevalue_estimator,
)
from tests.servers import running_server  # noqa: E402

PARAMS = {"hista": {"node_spacing": 4, "d_min": 1.0}, "numca": {"merge_distance": 4}}
# Value-for-value comparisons of two service calls use Numca: Hista's hidden states may
# differ in the last float bits between two calls batched differently, and a near-tie at
# the k-th neighbour then flips (tests/parity.py compares Hista across computations).
EXACT = "numca"
PENCILS = "Anna has 12 pencils and gives 4 away. How many pencils does she have left?"
# Written responses of different lengths (token ids through the model's tokenizer) and
# their rewards; sampling them from the 135M model on CPU would take most of a minute.
RESPONSES = {
    "uid-apples": (
        APPLES,
        [
            ("Tom starts with 5 apples. He buys 3 more, so 5 + 3 = 8. He has 8 apples now.", 1.0),
            ("5 + 3 = 8. The answer is 8.", 1.0),
            ("Tom had 5 apples and bought 3, so he has 5 - 3 = 2 apples.", 0.0),
            ("He has 53 apples.", 0.0),
        ],
    ),
    "uid-pencils": (
        PENCILS,
        [
            ("Anna gives away 4 of her 12 pencils, so 12 + 4 = 16 pencils are left.", 0.0),
            ("She has 12 - 4 = 8 pencils left. The answer is 8.", 1.0),
            ("Anna has 4 pencils left.", 0.0),
            ("12 - 4 = 8, so Anna has 8 pencils.", 1.0),
        ],
    ),
}
PER_GROUP = 4


class Batch:
    """A verl batch of 2 groups x 4 responses, rows shuffled, and the groups themselves."""

    def __init__(self, engine: Engine) -> None:
        self.groups: dict[str, Group] = {}
        rows: list[tuple[str, np.ndarray, np.ndarray, float]] = []
        for uid, (question, answers) in RESPONSES.items():
            prompt = engine.token_text.encode_chat([{"role": "user", "content": question}])
            rollouts = [Rollout(engine.token_text.encode_text(t), w) for t, w in answers]
            self.groups[uid] = Group(prompt_ids=prompt, rollouts=rollouts)
            rows += [(uid, prompt, np.asarray(r.response_ids), r.reward) for r in rollouts]
        width = max(len(p) for _, p, _, _ in rows)
        self.length = length = max(len(r) for _, _, r, _ in rows) + 3  # every row padded
        batch = len(rows)
        prompts = torch.zeros((batch, width), dtype=torch.int64)
        responses = torch.zeros((batch, length), dtype=torch.int64)
        attention_mask = torch.zeros((batch, width + length), dtype=torch.int64)
        rewards = torch.zeros((batch, length), dtype=torch.float32)
        for i, (_, prompt, response, reward) in enumerate(rows):
            prompts[i, width - len(prompt) :] = torch.as_tensor(prompt)
            responses[i, : len(response)] = torch.as_tensor(response)
            attention_mask[i, width - len(prompt) : width + len(response)] = 1
            rewards[i, len(response) - 1] = reward  # verl: the score on the last valid token
        data = DataProto.from_dict(
            tensors={
                "prompts": prompts,
                "responses": responses,
                "input_ids": torch.cat([prompts, responses], dim=1),
                "attention_mask": attention_mask,
                "response_mask": attention_mask[:, width:].clone(),
                "token_level_rewards": rewards,
            },
            non_tensors={"uid": np.array([uid for uid, *_ in rows], dtype=object)},
        )
        # verl reorders rows (e.g. balance_batch); groups must come back whole.
        self.order = np.random.default_rng(0).permutation(batch)
        data.reorder(torch.as_tensor(self.order))
        self.data = data

    def fresh(self) -> DataProto:
        return DataProto.from_dict(
            tensors={k: v.clone() for k, v in self.data.batch.items()},
            non_tensors={k: v.copy() for k, v in self.data.non_tensor_batch.items()},
        )

    def row_rollouts(self) -> Iterator[tuple[int, str, int]]:
        """(row, uid, index of the rollout in its group) for every row of the shuffled batch."""
        uids = list(RESPONSES)
        for row, source in enumerate(self.order.tolist()):
            yield row, uids[source // PER_GROUP], source % PER_GROUP


@pytest.fixture(scope="module")
def batch(engine: Engine) -> Batch:
    return Batch(engine)


@pytest.fixture(scope="module")
def client(backend: TorchBackend) -> Iterator[ValueClient]:
    with running_server(backend) as server, ValueClient(server.grpc_target) as value_client:
        yield value_client


def expected(client: ValueClient, batch: Batch, **params: Any) -> dict[str, Any]:
    """The service's answer for the groups in sampling order, asked directly."""
    answer = client.estimate(batch.groups.values(), (EXACT,), **params)
    return dict(zip(batch.groups, answer.groups, strict=True))


def test_verl_compute_advantage_dispatches_statevalue(
    batch: Batch, client: ValueClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = ray_trainer.compute_advantage
    calls: list[int] = []
    estimate = client.estimate

    def counting(groups: Any, *args: Any, **kwargs: Any) -> Any:
        groups = list(groups)
        calls.append(len(groups))
        return estimate(groups, *args, **kwargs)

    monkeypatch.setattr(client, "estimate", counting)
    uninstall = install_statevalue_estimator(client, method="hista")
    try:
        install_statevalue_estimator(client, method=EXACT, params=PARAMS)  # replaces the first
        hook = ray_trainer.compute_advantage
        assert hook is not original and hook.__wrapped__ is original  # wrapped once
        # A verl module that imported compute_advantage by name is re-pointed too.
        assert separation_trainer.compute_advantage is hook
        data = ray_trainer.compute_advantage(
            batch.fresh(), adv_estimator="statevalue", gamma=1.0, lam=1.0, num_repeat=4
        )
        assert calls == [2]  # one call, both groups whole
        # Other estimators still go to verl while the hook is installed.
        grpo = ray_trainer.compute_advantage(batch.fresh(), adv_estimator="grpo")
        assert calls == [2]
        np.testing.assert_allclose(
            grpo.batch["advantages"].numpy(), grpo_reference(batch)[0].numpy(), atol=1e-6
        )
    finally:
        uninstall()
    assert ray_trainer.compute_advantage is original
    assert separation_trainer.compute_advantage is original
    monkeypatch.undo()

    answers = expected(client, batch, **PARAMS)
    mask = data.batch["response_mask"].bool()
    for key in ("advantages", "values", "returns"):
        assert data.batch[key].dtype == torch.float32
        assert data.batch[key].shape == (len(batch.order), batch.length)
        assert not data.batch[key][~mask].any(), f"{key} must be 0 on padding"
    for row, uid, j in batch.row_rollouts():
        n = int(mask[row].sum())
        want = answers[uid].rollouts[j]
        assert n == len(batch.groups[uid].rollouts[j].response_ids)
        got = data.batch["advantages"][row, :n].numpy()
        np.testing.assert_allclose(got, want.advantages[EXACT], atol=1e-6)
        got = data.batch["values"][row, :n].numpy()
        np.testing.assert_allclose(got, want.values[EXACT], atol=1e-6)
        # returns: reward-to-go (gamma = 1): the rollout's reward on every valid token.
        reward = batch.groups[uid].rollouts[j].reward
        np.testing.assert_allclose(data.batch["returns"][row, :n].numpy(), reward)
    assert data.batch["advantages"].abs().sum() > 0


def grpo_reference(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    data = batch.fresh()
    return core_algos.compute_grpo_outcome_advantage(
        token_level_rewards=data.batch["token_level_rewards"],
        response_mask=data.batch["response_mask"],
        index=data.non_tensor_batch["uid"],
    )


def test_after_uninstall_verl_estimators_are_verls_own(batch: Batch, client: ValueClient) -> None:
    original = ray_trainer.compute_advantage
    install_statevalue_estimator(client)()
    assert ray_trainer.compute_advantage is original
    data = ray_trainer.compute_advantage(batch.fresh(), adv_estimator="grpo")
    advantages, returns = grpo_reference(batch)
    np.testing.assert_allclose(data.batch["advantages"].numpy(), advantages.numpy(), atol=1e-6)
    np.testing.assert_allclose(data.batch["returns"].numpy(), returns.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="statevalue"):
        ray_trainer.compute_advantage(batch.fresh(), adv_estimator="statevalue")


def test_unscaled_returns_are_values_plus_advantages(batch: Batch, client: ValueClient) -> None:
    params = {**PARAMS, "advantage": {"scale": "none"}}
    data = compute_statevalue_advantage(batch.fresh(), client, "hista", params)
    np.testing.assert_allclose(
        data.batch["returns"].numpy(),
        (data.batch["advantages"] + data.batch["values"]).numpy(),
        atol=1e-5,
    )


def test_token_rewards_pass_through(batch: Batch, client: ValueClient) -> None:
    data = batch.fresh()
    mask = data.batch["response_mask"].bool()
    # A KL-like penalty folded into the per-token rewards.
    penalty = -0.01 * torch.arange(batch.length, dtype=torch.float32).expand_as(mask) * mask
    data.batch["token_level_rewards"] += penalty
    token_rewards = data.batch["token_level_rewards"].clone()
    data = compute_statevalue_advantage(data, client, EXACT, PARAMS, use_token_rewards=True)
    sent = []
    rows = []
    for uid, group in batch.groups.items():
        rows += [(row, j) for row, u, j in batch.row_rollouts() if u == uid]
        rollouts = []
        for row, j in rows[-PER_GROUP:]:
            n = len(group.rollouts[j].response_ids)
            reward = float(token_rewards[row].sum())
            per_token = token_rewards[row, :n].numpy()
            rollouts.append(Rollout(group.rollouts[j].response_ids, reward, per_token))
        sent.append(Group(group.prompt_ids, rollouts))
    want = [r for g in client.estimate(sent, (EXACT,), **PARAMS).groups for r in g.rollouts]
    for (row, _), rollout in zip(rows, want, strict=True):
        n = len(rollout.advantages[EXACT])
        got = data.batch["advantages"][row, :n].numpy()
        np.testing.assert_allclose(got, rollout.advantages[EXACT], atol=1e-6)


def test_prompt_key_becomes_the_prompt_id(
    batch: Batch, client: ValueClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[str, str]] = []
    estimate = client.estimate

    def recording(groups: Any, *args: Any, **kwargs: Any) -> Any:
        groups = list(groups)
        sent.extend((g.group_id, g.prompt_id) for g in groups)
        return estimate(groups, *args, **kwargs)

    monkeypatch.setattr(client, "estimate", recording)
    data = batch.fresh()
    data.non_tensor_batch["index"] = np.array(
        [f"prompt-{uid[4:]}" for uid in data.non_tensor_batch["uid"]], dtype=object
    )
    compute_statevalue_advantage(data, client, "numca", prompt_key="index")
    assert sorted(sent) == [("uid-apples", "prompt-apples"), ("uid-pencils", "prompt-pencils")]
    with pytest.raises(KeyError, match="extra_key"):
        compute_statevalue_advantage(data, client, "numca", prompt_key="extra_key")


def test_missing_token_ids_name_the_legacy_trainer(batch: Batch, client: ValueClient) -> None:
    data = batch.fresh()
    data.batch.pop("prompts")
    with pytest.raises(KeyError, match="use_v1=False"):
        compute_statevalue_advantage(data, client)


def test_the_hook_syncs_the_last_update_and_asks_for_its_revision(
    batch: Batch, embedded_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    actor = AutoModelForCausalLM.from_pretrained(embedded_checkpoint)
    served = TorchBackend(str(embedded_checkpoint), device="cpu")  # its weights change
    with (
        running_server(served, admin_token="verl-admin") as server,
        ValueClient(server.grpc_target, retries=0) as client,
    ):
        required: list[int] = []
        estimate = client.estimate

        def recording(*args: Any, min_model_revision: int = 0, **kwargs: Any) -> Any:
            required.append(min_model_revision)
            return estimate(*args, min_model_revision=min_model_revision, **kwargs)

        monkeypatch.setattr(client, "estimate", recording)
        start = server.server.model_info()["revision"]
        sync = WeightSync(client, admin_token="verl-admin", sync_every=1)
        uninstall = install_statevalue_estimator(
            client, method=EXACT, params=PARAMS, weight_sync=sync, weights=actor.state_dict
        )
        ids = torch.arange(1, 40)[None]
        try:
            for step in (1, 2):
                ray_trainer.compute_advantage(batch.fresh(), adv_estimator="statevalue")
                with torch.no_grad():  # the actor update that follows the advantages
                    actor.model.norm.weight.mul_(1.5)
                    if step == 1:
                        synced = actor.model(ids).last_hidden_state[0]
        finally:
            uninstall()
            sync.close()
        # Step 1's weights are the server's own; step 2's estimate waits for the sync of
        # the first update and asks for its revision.
        assert required == [0, start + 1]
        info = server.server.model_info()
        assert (info["revision"], info["version"]) == (start + 1, "step-1")
    (got,) = served.hidden_states([ids[0].numpy().astype(np.int32)])
    torch.testing.assert_close(got, synced, rtol=1e-5, atol=1e-5)
