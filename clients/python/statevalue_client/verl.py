"""verl integration: per-token advantages from statevalue in verl's PPO loop (driver side).

    from statevalue_client import ValueClient
    from statevalue_client.verl import install_statevalue_estimator

    # In the process that runs RayPPOTrainer.fit(), before fit():
    install_statevalue_estimator(ValueClient("statevalue:50051"), method="hista")
    # and in the config: algorithm.adv_estimator=statevalue trainer.use_v1=False

verl computes advantages on the driver in ``verl.trainer.ppo.ray_trainer.compute_advantage``.
Estimators registered with ``core_algos.register_adv_est`` only see rewards, the response
mask and the group index, not the token ids the service needs, so the hook wraps
``compute_advantage`` itself: ``algorithm.adv_estimator=statevalue`` goes to
:func:`compute_statevalue_advantage` (one ``estimate()`` for the whole batch, which the client
splits into requests under the server's limits), every other
estimator to verl's own code. See docs/integrations.md for the configuration.

With a :class:`~statevalue_client.sync.WeightSync`, each estimate asks for the revision of
its last sync (``min_model_revision``), waiting for a sync in flight. The sync itself
needs the full weights in this process: given ``weights`` (a callable returning them), the
hook sends the weights of the last update at the next advantage step, every
``sync_every`` steps, before the estimate (verl's driver sees no earlier point of the step,
so this sync does not overlap the generation). A sync started elsewhere in this process
(``weight_sync.step_done``, e.g. right after the actor update) overlaps the generation.

Requires verl 0.9.1 (``from verl import DataProto``).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from statevalue_client.client import ValueClient
from statevalue_client.flat_batch import groups_from_flat_batch, scatter_to_padded
from statevalue_client.sync import NamedTensors, WeightSync
from statevalue_client.wire import content_step_id

ESTIMATOR_NAME = "statevalue"

# Modules that bind ``compute_advantage`` by name (``from ... import compute_advantage``);
# the hook re-points those already imported. Ones imported later bind the hook itself.
_BINDING_MODULES = (
    "verl.trainer.ppo.ray_trainer",
    "verl.trainer.ppo.v1.utils",
    "verl.experimental.separation.ray_trainer",
)


def compute_statevalue_advantage(
    data: Any,
    client: ValueClient,
    method: str = "hista",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    use_token_rewards: bool = False,
    *,
    prompt_key: str | None = None,
    min_model_revision: int = 0,
) -> Any:
    """Write the service's ``advantages``, ``returns`` and ``values`` into a verl batch.

    Args:
        data: a verl ``DataProto`` with ``prompts`` ``[B, P]`` (left-padded),
            ``responses`` ``[B, L]``, ``attention_mask`` ``[B, P + L]``,
            ``token_level_rewards`` ``[B, L]``, optionally ``response_mask`` ``[B, L]``, and
            ``non_tensor_batch["uid"]`` (one id per group). Rows may be in any order.
        client: a connected :class:`ValueClient`.
        method: ``"hista"``, ``"numca"`` or ``"group_mean"``.
        params: estimator parameters per section, e.g. ``{"hista": {"node_spacing": 10}}``.
        use_token_rewards: send ``token_level_rewards`` as per-token rewards (e.g. with a KL
            penalty folded in by ``algorithm.use_kl_in_reward``); otherwise each row's
            reward is their sum, on the last token.
        prompt_key: a ``non_tensor_batch`` field holding a stable id per prompt (e.g.
            ``"index"`` when every dataset row sets a unique ``extra_info.index``), so Numca
            accumulates across steps. ``uid`` changes every step and cannot serve.
        min_model_revision: refuse answers from weights older than this revision.

    Returns:
        ``data``, with float32 ``[B, L]`` tensors on the device of ``token_level_rewards``,
        zero outside the response mask:

        - ``advantages``: the service's per-token advantages.
        - ``values``: the service's per-token values V(prompt + response[:t]).
        - ``returns``: the discounted reward-to-go of ``token_level_rewards``
          (γ = ``params["advantage"]["gamma"]``, default 1), i.e. verl's GAE returns with
          λ = 1: the Monte-Carlo target of ``values``. With segment GAE, λ = 1 and
          ``advantage.scale="none"`` it equals ``advantages + values``; with the default
          reward-std scaling the advantages are not in reward units and that sum is not a
          return. Nothing reads ``returns`` in a run without a critic.
    """
    batch = data.batch
    missing = [
        k
        for k in ("prompts", "responses", "attention_mask", "token_level_rewards")
        if k not in batch.keys()
    ]
    if missing or "uid" not in data.non_tensor_batch:
        raise KeyError(
            f"statevalue advantages need {missing or ['non_tensor_batch.uid']} in the batch; "
            "verl's v1 trainer does not pass token ids to the advantage step, "
            "run the legacy trainer (trainer.use_v1=False)"
        )
    prompts = batch["prompts"]
    width = prompts.shape[1]
    attention_mask = batch["attention_mask"]
    if "response_mask" in batch.keys():
        response_mask = batch["response_mask"]
    else:
        response_mask = attention_mask[:, width:]
    token_rewards = batch["token_level_rewards"].detach().float()
    mask = response_mask.detach().cpu().numpy().astype(bool)
    if prompt_key is not None and prompt_key not in data.non_tensor_batch:
        raise KeyError(f"prompt_key {prompt_key!r} is not in the batch's non_tensor_batch")
    params = {section: dict(values) for section, values in (params or {}).items()}

    groups, layout = groups_from_flat_batch(
        prompts,
        attention_mask[:, :width],
        batch["responses"],
        mask,
        token_rewards.sum(-1),
        np.asarray(data.non_tensor_batch["uid"]),
        prompt_keys=None if prompt_key is None else list(data.non_tensor_batch[prompt_key]),
        token_rewards=token_rewards if use_token_rewards else None,
    )
    # A content step id: a retried step with the same rollouts resumes the failed try.
    result = client.estimate(
        groups,
        (method,),
        step_id=content_step_id(groups),
        min_model_revision=min_model_revision,
        **params,
    )
    values, advantages = scatter_to_padded(result, layout, mask)[method]

    device = token_rewards.device
    gamma = float(params.get("advantage", {}).get("gamma", 1.0))
    valid = torch.from_numpy(mask).to(device)
    batch["advantages"] = torch.from_numpy(advantages).to(device)
    batch["values"] = torch.from_numpy(values).to(device)
    batch["returns"] = _reward_to_go(token_rewards, valid, gamma)
    return data


def _reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Σ_{k ≥ t, k valid} γ^(#valid steps) r_k over valid tokens (verl's GAE skip), 0 elsewhere."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


@dataclass
class _Route:
    client: ValueClient
    method: str
    params: dict[str, dict[str, Any]]
    use_token_rewards: bool
    prompt_key: str | None
    weight_sync: WeightSync | None
    weights: Callable[[], NamedTensors] | None
    # Advantage steps so far: the n-th sees the weights of n - 1 actor updates.
    steps: int = 0

    def min_model_revision(self) -> int:
        """The revision this step's estimate asks for, after the sync it relies on."""
        if self.weight_sync is None:
            return 0
        self.steps += 1
        if self.weights is not None and self.steps > 1:
            self.weight_sync.step_done(self.steps - 1, self.weights)
        return self.weight_sync.revision()


_route: _Route | None = None
_hook: Callable[..., Any] | None = None


def _estimator_name(adv_estimator: Any) -> str:
    return str(getattr(adv_estimator, "value", adv_estimator))


def _make_hook(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def compute_advantage(
        data: Any,
        adv_estimator: Any,
        gamma: float = 1.0,
        lam: float = 1.0,
        num_repeat: int = 1,
        norm_adv_by_std_in_grpo: bool = True,
        config: Any = None,
    ) -> Any:
        route = _route
        if route is None or _estimator_name(adv_estimator) != ESTIMATOR_NAME:
            return original(
                data,
                adv_estimator=adv_estimator,
                gamma=gamma,
                lam=lam,
                num_repeat=num_repeat,
                norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
                config=config,
            )
        # verl's algorithm.gamma / algorithm.lam unless the params set them.
        params = {section: dict(values) for section, values in route.params.items()}
        params["advantage"] = {
            "gamma": float(gamma),
            "lam": float(lam),
            **params.get("advantage", {}),
        }
        return compute_statevalue_advantage(
            data,
            route.client,
            route.method,
            params,
            route.use_token_rewards,
            prompt_key=route.prompt_key,
            min_model_revision=route.min_model_revision(),
        )

    return compute_advantage


def install_statevalue_estimator(
    client: ValueClient,
    method: str = "hista",
    params: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    use_token_rewards: bool = False,
    prompt_key: str | None = None,
    weight_sync: WeightSync | None = None,
    weights: Callable[[], NamedTensors] | None = None,
) -> Callable[[], None]:
    """Route ``algorithm.adv_estimator=statevalue`` to the service; returns an uninstall.

    Wraps ``verl.trainer.ppo.ray_trainer.compute_advantage`` in this process (call it in
    the process that runs ``trainer.fit()``). Every other estimator still goes to verl.
    Installing again replaces the client, method and parameters; it never wraps twice, and
    the returned callable (of any install) restores verl's function.
    verl's ``algorithm.gamma`` and ``algorithm.lam`` become the service's
    ``advantage.gamma`` / ``advantage.lam`` unless ``params["advantage"]`` sets them.
    ``weight_sync`` and ``weights``: keep the service's weights fresh (module docstring).
    The other arguments are :func:`compute_statevalue_advantage`'s.
    """
    global _route, _hook
    from verl.trainer.ppo import ray_trainer

    if _hook is None or ray_trainer.compute_advantage is not _hook:
        _hook = _make_hook(ray_trainer.compute_advantage)
    hook = _hook
    original = hook.__wrapped__  # type: ignore[attr-defined]
    for name in _BINDING_MODULES:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "compute_advantage", None) is original:
            module.compute_advantage = hook  # type: ignore[attr-defined]
    _route = _Route(
        client=client,
        method=method,
        params={section: dict(values) for section, values in (params or {}).items()},
        use_token_rewards=use_token_rewards,
        prompt_key=prompt_key,
        weight_sync=weight_sync,
        weights=weights,
    )

    def uninstall() -> None:
        """Give ``compute_advantage`` back to verl (whichever install returned this)."""
        global _route
        _route = None
        for name in _BINDING_MODULES:
            module = sys.modules.get(name)
            if module is not None and getattr(module, "compute_advantage", None) is hook:
                module.compute_advantage = original  # type: ignore[attr-defined]

    return uninstall
