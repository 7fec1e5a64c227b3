"""TRL's GRPOTrainer trains on statevalue's per-token advantages, end to end on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig

from statevalue.backends.no_model import NoModelBackend
from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.states import StatesFormat
from statevalue_client.trl import StateValueGRPOTrainer, batch_rows
from tests.conftest import APPLES, last_number_reward
from tests.servers import running_server

TOKEN = "trl-admin"

PARAMS = {"hista": {"node_spacing": 4, "d_min": 1.0}}


def apples_reward(completions: list[Any], **_: Any) -> list[float]:
    return [last_number_reward(c[0]["content"], 8) for c in completions]


class RecordingTrainer(StateValueGRPOTrainer):
    """Keeps what the service was asked and what the loss was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scored: list[tuple[dict[str, torch.Tensor], np.ndarray]] = []
        self.loss_inputs: list[dict[str, torch.Tensor]] = []

    def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
        output = super()._generate_and_score_completions(inputs)
        self.scored.append(({k: v for k, v in output.items()}, self._global_rewards.numpy()))
        return output

    def _compute_loss(self, model, inputs):  # type: ignore[no-untyped-def]
        self.loss_inputs.append(inputs)
        return super()._compute_loss(model, inputs)


def grpo_setup(
    checkpoint: Path, output: Path, **config: Any
) -> tuple[Any, Any, Dataset, GRPOConfig]:
    """Tokenizer, model, dataset and a two-step CPU GRPO configuration (``config``
    overrides its fields)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": APPLES}]] * 4})
    fields: dict[str, Any] = {
        "output_dir": str(output),
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 24,
        "max_steps": 2,
        "learning_rate": 1e-6,
        "beta": 0.0,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": 0,
    }
    args = GRPOConfig(**{**fields, **config})
    return tokenizer, model, dataset, args


def trained(
    setup: tuple[Any, Any, Dataset, GRPOConfig], client: ValueClient, **extra: Any
) -> RecordingTrainer:
    """Two GRPO steps of the recording trainer with Hista advantages from ``client``."""
    tokenizer, model, dataset, args = setup
    trainer = RecordingTrainer(
        model=model,
        reward_funcs=[apples_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        value_client=client,
        value_method="hista",
        value_params=PARAMS,
        **extra,
    )
    trainer.train()
    return trainer


def scored_group(
    output: dict[str, torch.Tensor], rewards: np.ndarray
) -> tuple[list[tuple[np.ndarray, np.ndarray]], Group]:
    """The (prompt, completion) ids of a scored batch's rows and the group they form."""
    rows = batch_rows(output)
    group = Group(
        prompt_ids=rows[0][0],
        rollouts=[Rollout(c, float(r)) for (_, c), r in zip(rows, rewards, strict=True)],
    )
    return rows, group


@pytest.mark.slow
def test_grpo_steps_use_the_service_advantages(
    backend: TorchBackend, embedded_checkpoint: Path, tmp_path: Path
) -> None:
    with running_server(backend) as server, ValueClient(server.grpc_target) as client:
        trainer = trained(grpo_setup(embedded_checkpoint, tmp_path), client)
        assert len(trainer.scored) == 2 and len(trainer.loss_inputs) == 2
        for (output, rewards), used in zip(trainer.scored, trainer.loss_inputs, strict=True):
            # Four completions of one prompt form one group; ask the service directly.
            rows, group = scored_group(output, rewards)
            expected = client.estimate([group], ("hista",), **PARAMS).groups[0]
            for row, rollout in enumerate(expected.rollouts):
                n = len(rows[row][1])
                got = output["advantages"][row].numpy()
                np.testing.assert_allclose(got[:n], rollout.advantages["hista"], atol=1e-6)
                assert not got[n:].any()
            # The loss saw the same per-token advantages (TRL shuffles the rows).
            assert used["advantages"].shape == output["advantages"].shape
            seen = sorted(map(tuple, used["advantages"].numpy().round(5).tolist()))
            sent = sorted(map(tuple, output["advantages"].numpy().round(5).tolist()))
            assert seen == sent


@pytest.mark.slow
def test_grpo_trains_on_trainer_side_states_against_a_server_with_no_model(
    backend: TorchBackend, embedded_checkpoint: Path, tmp_path: Path
) -> None:
    """Hista from the trainer's own hidden states, answered by ``--backend none``: the
    first step's advantages are those of the server's forward path on the same rollouts."""
    setup = grpo_setup(embedded_checkpoint, tmp_path)
    states = StatesFormat.for_hista(setup[1].config.hidden_size, PARAMS["hista"])
    with (
        running_server(NoModelBackend("embedded")) as server,
        ValueClient(server.grpc_target) as client,
    ):
        assert client.model_info().backend == "none"
        trainer = trained(setup, client, value_states=states)
    assert len(trainer.scored) == 2 and len(trainer.loss_inputs) == 2
    output, rewards = trainer.scored[0]
    rows, group = scored_group(output, rewards)
    with running_server(backend) as server, ValueClient(server.grpc_target) as client:
        expected = client.estimate([group], ("hista",), **PARAMS).groups[0]
    for row, rollout in enumerate(expected.rollouts):
        n = len(rows[row][1])
        got = output["advantages"][row].numpy()
        np.testing.assert_allclose(got[:n], rollout.advantages["hista"], atol=1e-4)


class RecordingClient(ValueClient):
    """Keeps the ``min_model_revision`` of every estimate."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.required: list[int] = []

    def estimate(self, *args: Any, min_model_revision: int = 0, **kwargs: Any) -> Any:  # type: ignore[override]
        self.required.append(min_model_revision)
        return super().estimate(*args, min_model_revision=min_model_revision, **kwargs)


@pytest.mark.slow
def test_grpo_keeps_the_service_weights_in_step_with_the_trainer(
    embedded_checkpoint: Path, tmp_path: Path
) -> None:
    """Every optimizer step's weights reach the server (sync_every 1) while the next step
    generates, and each estimate asks for the revision of the sync it relies on."""
    setup = grpo_setup(
        embedded_checkpoint,
        tmp_path,
        learning_rate=1e-3,  # weights that visibly move in two steps
        # The completions' text does not matter here: few and short.
        max_completion_length=8,
        per_device_train_batch_size=2,
        num_generations=2,
    )
    served = TorchBackend(str(embedded_checkpoint), device="cpu")  # its weights change
    with (
        running_server(served, admin_token=TOKEN) as server,
        RecordingClient(server.grpc_target, retries=0) as client,
    ):
        start = server.server.model_info()["revision"]
        trainer = trained(setup, client, value_admin_token=TOKEN, value_sync_every=1)
        info = client.model_info()
    # Step 1 asks for nothing synced; step 2 for the weights after step 1.
    assert client.required == [0, start + 1]
    assert (info.revision, info.version) == (start + 2, "step-2")
    model = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.arange(1, 40)[None]
    with torch.no_grad():
        want = model.model(ids).last_hidden_state[0]
    (got,) = served.hidden_states([ids[0].numpy().astype(np.int32)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
