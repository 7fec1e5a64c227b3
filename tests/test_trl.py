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

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.trl import StateValueGRPOTrainer
from tests.conftest import APPLES, last_number_reward
from tests.servers import running_server

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


@pytest.mark.slow
def test_grpo_steps_use_the_service_advantages(
    backend: TorchBackend, embedded_checkpoint: Path, tmp_path: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(embedded_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(embedded_checkpoint)
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": APPLES}]] * 4})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        max_steps=2,
        learning_rate=1e-6,
        beta=0.0,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    with running_server(backend) as server, ValueClient(server.grpc_target) as client:
        trainer = RecordingTrainer(
            model=model,
            reward_funcs=[apples_reward],
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            value_client=client,
            value_method="hista",
            value_params=PARAMS,
        )
        trainer.train()
        assert len(trainer.scored) == 2 and len(trainer.loss_inputs) == 2
        for (output, rewards), used in zip(trainer.scored, trainer.loss_inputs, strict=True):
            mask = output["completion_mask"].bool()
            rows = [
                (p[m.bool()].numpy(), c[cm].numpy())
                for p, m, c, cm in zip(
                    output["prompt_ids"],
                    output["prompt_mask"],
                    output["completion_ids"],
                    mask,
                    strict=True,
                )
            ]
            # Four completions of one prompt form one group; ask the service directly.
            group = Group(
                prompt_ids=rows[0][0],
                rollouts=[Rollout(c, float(r)) for (_, c), r in zip(rows, rewards, strict=True)],
            )
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
