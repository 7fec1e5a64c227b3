"""Monte Carlo targets: states drawn from the rollouts, continuations sampled from each
with the policy and scored by the user's reward function."""

from __future__ import annotations

import importlib
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from statevalue.engine import PreparedGroup
from statevalue.schema import GroupInput

RewardFunction = Callable[[str, str], float]


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
