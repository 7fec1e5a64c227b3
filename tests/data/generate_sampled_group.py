"""Writes tests/data/sampled_group.json: 8 real responses of the embedded model, mixed rewards.

    python -m tests.data.generate_sampled_group [--output tests/data/sampled_group.json]

The responses (<= 100 tokens) are sampled from SmolLM2-135M-Instruct on the APPLES prompt
with the first seed (of 0..4) whose group has both right and wrong answers; the reward is
1 when the last number in the decoded response is 8. The tests read the committed file
instead of sampling, which costs a minute of CPU per test session and differs between
torch releases.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from statevalue.backends.embedded import cached_embedded_checkpoint
from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from tests.conftest import ANSWER, APPLES, MAX_NEW_TOKENS, SAMPLED_GROUP, last_number_reward

GENERATOR_VERSION = 1


def sample(backend: TorchBackend) -> dict:
    """The group as the committed file holds it."""
    engine = Engine(backend)
    prompt = engine.token_text.encode_chat([{"role": "user", "content": APPLES}])
    for seed in range(5):
        responses = backend.generate(prompt, 8, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
        rewards = [
            last_number_reward(engine.token_text.decode_with_offsets(r)[0], ANSWER)
            for r in responses
        ]
        if 0 < sum(rewards) < len(rewards):
            break
    else:
        raise SystemExit("no seed of 0..4 gave a group with mixed rewards")
    return {
        "generator": f"tests/data/generate_sampled_group.py v{GENERATOR_VERSION}",
        "model": backend.identity.name,
        "seed": seed,
        "max_new_tokens": MAX_NEW_TOKENS,
        "prompt": APPLES,
        "prompt_ids": [int(i) for i in prompt],
        "rollouts": [
            {"response_ids": [int(i) for i in r], "reward": w}
            for r, w in zip(responses, rewards, strict=True)
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=SAMPLED_GROUP)
    args = parser.parse_args(argv)
    backend = TorchBackend(str(cached_embedded_checkpoint()), device="cpu")
    group = sample(backend)
    rollouts = group.pop("rollouts")
    # One line per rollout: diffs of a regenerated file stay readable.
    lines = [f" {json.dumps(key)}: {json.dumps(value)}," for key, value in group.items()]
    lines += [' "rollouts": [', ",\n".join(f"  {json.dumps(r)}" for r in rollouts), " ]"]
    args.output.write_text("{\n" + "\n".join(lines) + "\n}\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
