"""TRL integration: GRPO with per-token advantages from statevalue instead of the group mean.

    from statevalue_client import ValueClient
    from statevalue_client.trl import StateValueGRPOTrainer

    trainer = StateValueGRPOTrainer(
        model=model, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=dataset,
        processing_class=tokenizer,
        value_client=ValueClient("localhost:50051"), value_method="hista",
    )
    trainer.train()

TRL samples ``num_generations`` completions per prompt as consecutive rows of the global
generation batch and slices that batch across processes. The trainer gathers every
process's rows, lets the main process ask the service for the whole batch (groups stay
whole), broadcasts the answer and keeps its own slice. The loss accepts ``[B, T]``
advantages, so the service's per-token advantages are used as they are.

With ``value_states`` (a :class:`~statevalue_client.states.StatesFormat`), Hista's
representations come from the trainer's own last-layer hidden states: a hook on the final
norm keeps those of TRL's log-probability pass when it runs one during generation
(``num_iterations`` > 1, or generation ahead of the optimizer steps) and otherwise runs one
no-grad forward pass; the server needs no model (``statevalue serve --backend none``).

With ``value_admin_token`` the trainer keeps the service's weights fresh: every
``value_sync_every`` optimizer steps (default :data:`~statevalue_client.sync.DEFAULT_SYNC_EVERY`)
the main process sends its model's state dict with ``update_weights`` on a thread of its
own, while TRL generates the next step's completions; the next estimate waits for it and
asks for the revision it produced (``min_model_revision``), and the next optimizer step
waits for it too. The main process must hold the full weights (one process, or DDP).

Requires ``pip install "statevalue-client[trl]"`` (TRL 1.16).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer

from statevalue_client.client import ValueClient
from statevalue_client.flat_batch import groups_from_flat_batch, scatter_to_padded
from statevalue_client.states import (
    FinalNormCapture,
    StatesFormat,
    rollout_representations,
    split_group,
)
from statevalue_client.sync import DEFAULT_SYNC_EVERY, WeightSync
from statevalue_client.wire import content_step_id


def batch_rows(output: Mapping[str, torch.Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The prompt and completion ids (real tokens only) of each row of TRL's scored batch."""
    return [
        (p[m.bool()].cpu().numpy(), c[cm.bool()].cpu().numpy())
        for p, m, c, cm in zip(
            output["prompt_ids"],
            output["prompt_mask"],
            output["completion_ids"],
            output["completion_mask"],
            strict=True,
        )
    ]


class StateValueGRPOTrainer(GRPOTrainer):
    """A GRPOTrainer whose advantages come from a statevalue server.

    Args:
        value_client: a connected :class:`ValueClient`.
        value_method: ``"hista"``, ``"numca"`` or ``"group_mean"``.
        value_params: estimator parameters per section, e.g. ``{"hista": {"node_spacing": 10}}``.
        value_states: send Hista's representations made from the trainer's hidden states in
            this format (its Hista fields must match ``value_params``); None: the server
            runs the model.
        value_admin_token: the servers' admin token: send the trainer's weights to them
            every ``value_sync_every`` optimizer steps; None: never.
        value_sync_every: optimizer steps between two weight syncs.
        value_sync_transport: ``update_weights``'s ``transport``.
        All other arguments are GRPOTrainer's.
    """

    def __init__(
        self,
        *args: Any,
        value_client: ValueClient,
        value_method: str = "hista",
        value_params: Mapping[str, Mapping[str, Any]] | None = None,
        value_states: StatesFormat | None = None,
        value_admin_token: str | None = None,
        value_sync_every: int = DEFAULT_SYNC_EVERY,
        value_sync_transport: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.value_client = value_client
        self.value_method = value_method
        self.value_params = dict(value_params or {})
        self.value_states = value_states
        self._global_rewards: torch.Tensor | None = None
        self._captured: list[torch.Tensor] = []
        #: The weight sync (on the main process, with an admin token; None elsewhere).
        self.weight_sync: WeightSync | None = None
        if value_admin_token is not None and self.accelerator.is_main_process:
            self.weight_sync = WeightSync(
                value_client,
                admin_token=value_admin_token,
                sync_every=value_sync_every,
                transport=value_sync_transport,
            )
            self.add_callback(_SyncWeights(self.weight_sync, self._full_weights))

    def _full_weights(self) -> dict[str, torch.Tensor]:
        return self.accelerator.unwrap_model(self.model).state_dict()

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[no-untyped-def]
        # TRL gathers rewards across processes here; keep the weighted sum for the service.
        rewards_per_func = super()._calculate_rewards(
            inputs, prompts, completions, completion_ids_list
        )
        weights = self.reward_weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan
        self._global_rewards = rewards.detach().cpu()
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # type: ignore[no-untyped-def]
        if self.value_states is None:
            output = super()._generate_and_score_completions(inputs)
        else:
            capture = _Capture(self.accelerator.unwrap_model(self.model))
            with capture:
                output = super()._generate_and_score_completions(inputs)
            self._captured = capture.kept
        if not self.model.training:
            return output
        assert self._global_rewards is not None
        local = batch_rows(output)
        rows = gather_object(local)
        states = None if self.value_states is None else gather_object(self._states(output))
        answer: list[Any] = [None]
        if self.accelerator.is_main_process:
            answer = [self._service_advantages(rows, self._global_rewards.numpy(), states)]
        advantages = broadcast_object_list(answer)[0]
        start = self.accelerator.process_index * len(local)
        mine = advantages[start : start + len(local)]
        width = output["completion_ids"].shape[1]
        padded = np.zeros((len(local), width), dtype=np.float32)
        for row, values in enumerate(mine):
            padded[row, : len(values)] = values
        output["advantages"] = torch.from_numpy(padded).to(output["completion_ids"].device)
        return output

    def _states(self, output: dict[str, torch.Tensor]) -> list[np.ndarray]:
        """This process's rows' whole Hista representations, from the hidden states of
        TRL's log-probability pass when it ran one, else from a no-grad pass here."""
        assert self.value_states is not None
        ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        full = [h for h in self._captured if h.shape[1] == ids.shape[1]]
        if sum(len(h) for h in full) == len(ids):
            hidden = torch.cat(full)
        else:
            capture = FinalNormCapture(self.accelerator.unwrap_model(self.model))
            with capture, torch.no_grad():
                self.model(input_ids=ids, attention_mask=mask)
            assert capture.hidden is not None
            hidden = capture.hidden
        self._captured = []
        rows = [hidden[r][mask[r].bool()] for r in range(len(ids))]
        return rollout_representations(rows, self.value_states)

    def _service_advantages(
        self,
        rows: list[tuple[np.ndarray, np.ndarray]],
        rewards: np.ndarray,
        states: list[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        """Per-row advantages (valid completion tokens only) for the whole global batch."""
        n = self.num_generations
        prompt_width = max(len(p) for p, _ in rows)
        completion_width = max(1, max(len(c) for _, c in rows))
        prompt_ids = np.zeros((len(rows), prompt_width), dtype=np.int64)
        prompt_mask = np.zeros_like(prompt_ids)
        completion_ids = np.zeros((len(rows), completion_width), dtype=np.int64)
        completion_mask = np.zeros_like(completion_ids)
        for i, (prompt, completion) in enumerate(rows):
            prompt_ids[i, prompt_width - len(prompt) :] = prompt
            prompt_mask[i, prompt_width - len(prompt) :] = 1
            completion_ids[i, : len(completion)] = completion
            completion_mask[i, : len(completion)] = 1
        groups, layout = groups_from_flat_batch(
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            rewards,
            np.arange(len(rows)) // n,
        )
        if states is not None:
            assert self.value_states is not None
            for group, members in zip(groups, layout.rows, strict=True):
                group.hista_states = split_group(
                    [states[row] for row in members], len(group.prompt_ids), self.value_states
                )
        # A content step id: if this step fails and the trainer retries it with the same
        # rollouts, the client resumes it instead of sending it all again.
        result = self.value_client.estimate(
            groups,
            (self.value_method,),
            step_id=content_step_id(groups),
            min_model_revision=0 if self.weight_sync is None else self.weight_sync.revision(),
            **self.value_params,
        )
        _, advantages = scatter_to_padded(result, layout, completion_mask)[self.value_method]
        # Unscorable completions (NaN reward) carry no signal, as in TRL.
        advantages[np.isnan(rewards)] = 0.0
        return [advantages[i, : len(c)] for i, (_, c) in enumerate(rows)]


class _Capture(FinalNormCapture):
    """The final norm's outputs of every multi-token forward pass (prefill and log-prob
    passes; single-token decoding steps are dropped)."""

    def __enter__(self) -> _Capture:
        self.kept: list[torch.Tensor] = []
        super().__enter__()
        return self

    def _keep(self, module: Any, inputs: Any, output: torch.Tensor) -> None:
        if output.dim() == 3 and output.shape[1] > 1:
            self.kept.append(output.detach())


class _SyncWeights(TrainerCallback):
    """Starts a weight sync after each optimizer step (every ``sync_every``-th sends) and
    holds the next optimizer step, and the end of training, until it is over."""

    def __init__(self, sync: WeightSync, weights: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.sync = sync
        self.weights = weights

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync.step_done(state.global_step, self.weights)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync.wait()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.sync.wait()
