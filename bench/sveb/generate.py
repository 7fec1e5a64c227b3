"""Build an SVEB-style value-estimation set with the embedded model (or any local model).

For each word problem: G sampled responses with their 0/1 rewards and, on the dev and test
splits, a few random states (response i, position t with 0 < t < len) whose target value
is the mean reward of K Monte Carlo continuations from prompt + response[:t], sampled at
the same temperature with the same total token budget. The train split has no states: it
only trains the learned-critic baseline.

Output: one JSON line per prompt in ``<out-dir>/<split>.jsonl``. Seeded and resumable:
prompts already in the files are skipped, so an interrupted run continues where it stopped.
Splits are interleaved (dev, test, train, dev, ...) so a partial run is balanced.

Example::

    nice -n 10 python -m bench.sveb.generate --out-dir bench/sveb/data \\
        --dev 40 --test 40 --train 40
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.sveb.backend_args import add_backend_arguments, apply_threads  # noqa: E402
from bench.sveb.problems import FAMILIES, Problem, make_problem, reward  # noqa: E402

DEFAULT_FAMILIES = ("add", "sub", "mul", "two_step")
SPLITS = ("dev", "test", "train")


@dataclass(frozen=True)
class PlannedPrompt:
    """One prompt of the plan: its id, split, index inside the split and problem."""

    id: str
    split: str
    index: int
    problem: Problem
    seed: int


def plan_prompts(
    counts: dict[str, int], families: list[str], seed: int, written: dict[str, str] | None = None
) -> list[PlannedPrompt]:
    """The prompts of every split, interleaved; families round-robin, questions unique.

    Each split draws from its own RNG (seeded by ``seed`` and the split name), so a split's
    problems do not depend on the other splits' sizes except through de-duplication.
    ``written`` maps the ids of prompts already in the files to their questions: no new
    prompt repeats one of them, even when a resumed run with larger counts would otherwise
    draw it for another split.
    """
    written = written or {}
    used: set[str] = set(written.values())
    per_split: dict[str, list[PlannedPrompt]] = {}
    for split in SPLITS:
        rng = random.Random(f"sveb-{seed}-{split}")
        items = []
        for index in range(counts.get(split, 0)):
            family = families[index % len(families)]
            planned_id = f"{split}-{index:04d}"
            for _ in range(1000):
                problem = make_problem(family, rng)
                if planned_id in written or problem.question not in used:
                    break
            if planned_id not in written:
                used.add(problem.question)
            items.append(
                PlannedPrompt(
                    id=planned_id,
                    split=split,
                    index=index,
                    problem=problem,
                    seed=rng.randrange(2**31),
                )
            )
        per_split[split] = items
    longest = max((len(v) for v in per_split.values()), default=0)
    return [
        per_split[split][i] for i in range(longest) for split in SPLITS if i < len(per_split[split])
    ]


def written_questions(out_dir: Path) -> dict[str, str]:
    """Id -> question of the prompts already written (complete JSON lines only)."""
    written: dict[str, str] = {}
    for split in SPLITS:
        path = out_dir / f"{split}.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                written[record["id"]] = record["question"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by an interrupted run
    return written


def _decode(backend: Any, ids: np.ndarray) -> str:
    return backend.tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def build_record(
    backend: Any,
    token_text: Any,
    item: PlannedPrompt,
    *,
    group_size: int,
    num_states: int,
    mc_samples: int,
    temperature: float,
    max_new_tokens: int,
) -> dict[str, Any]:
    """Sample the group, pick the states and roll out their continuations; one JSON record."""
    problem = item.problem
    rng = random.Random(item.seed)
    prompt = token_text.encode_chat([{"role": "user", "content": problem.question}])
    responses = backend.generate(
        prompt,
        group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        seed=rng.randrange(2**31),
    )
    texts = [_decode(backend, r) for r in responses]
    rewards = [reward(text, problem.answer) for text in texts]
    states = []
    if item.split != "train":
        eligible = [i for i, r in enumerate(responses) if len(r) >= 2]
        for i in rng.sample(eligible, min(num_states, len(eligible))):
            t = rng.randint(1, len(responses[i]) - 1)
            prefix = responses[i][:t]
            continuations = backend.generate(
                np.concatenate([prompt, prefix]),
                mc_samples,
                max_new_tokens=max_new_tokens - t,
                temperature=temperature,
                seed=rng.randrange(2**31),
            )
            mc = [
                reward(_decode(backend, np.concatenate([prefix, c])), problem.answer)
                for c in continuations
            ]
            states.append(
                {
                    "response": i,
                    "t": t,
                    "continuation_rewards": mc,
                    "continuation_lengths": [len(c) for c in continuations],
                    "target": float(np.mean(mc)),
                }
            )
    return {
        "id": item.id,
        "split": item.split,
        "family": problem.family,
        "question": problem.question,
        "answer": problem.answer,
        "model": {"name": backend.identity.name, "version": backend.identity.version},
        "temperature": temperature,
        "max_new_tokens": max_new_tokens,
        "seed": item.seed,
        "prompt_ids": prompt.tolist(),
        "responses": [
            {"ids": r.tolist(), "text": text, "reward": w}
            for r, text, w in zip(responses, texts, rewards, strict=True)
        ],
        "rewards": rewards,
        "states": states,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/sveb/data"))
    add_backend_arguments(parser, "TorchBackend model")
    parser.add_argument("--dev", type=int, default=40, help="dev prompts (with states)")
    parser.add_argument("--test", type=int, default=40, help="test prompts (with states)")
    parser.add_argument("--train", type=int, default=40, help="train prompts (no states)")
    parser.add_argument(
        "--families",
        default=",".join(DEFAULT_FAMILIES),
        help=f"comma-separated, of: {', '.join(FAMILIES)}",
    )
    parser.add_argument("--group-size", "-G", type=int, default=16, help="responses per prompt")
    parser.add_argument("--states", type=int, default=2, help="random states per prompt")
    parser.add_argument("--mc", "-K", type=int, default=16, help="continuations per state")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-minutes", type=float, default=0.0, help="stop after this long (0: no limit)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Generate (or resume) the set; returns the process exit status.

    ``backend`` reuses an already loaded TorchBackend (tests) instead of loading ``--model``.
    """
    args = parse_args(argv)
    apply_threads(args)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    for family in families:
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    from tqdm import tqdm

    from statevalue.backends.torch_backend import TorchBackend
    from statevalue.tokenization import TokenText

    counts = {"dev": args.dev, "test": args.test, "train": args.train}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    written = written_questions(args.out_dir)
    plan = plan_prompts(counts, families, args.seed, written)
    todo = [item for item in plan if item.id not in written]
    if not todo:
        print(f"all {len(plan)} prompts already in {args.out_dir}")
        return 0
    if backend is None:
        backend = TorchBackend(args.model, device=args.device)
    token_text = TokenText(backend.tokenizer, backend.vocab_size)
    start = time.monotonic()
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), disable=args.no_progress)
    for item in todo:
        if args.max_minutes and time.monotonic() - start > 60 * args.max_minutes:
            print(f"stopping after {args.max_minutes} minutes; run again to resume")
            break
        record = build_record(
            backend,
            token_text,
            item,
            group_size=args.group_size,
            num_states=args.states,
            mc_samples=args.mc,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
        )
        with (args.out_dir / f"{item.split}.jsonl").open("a") as handle:
            handle.write(json.dumps(record, separators=(",", ":")) + "\n")
        bar.update(1)
        bar.set_postfix(split=item.split, pass_rate=f"{np.mean(record['rewards']):.2f}")
    bar.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
