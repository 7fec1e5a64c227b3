"""How stale may the served weights be before Hista's values get worse?

Three phases, each cached under ``--out`` so an interrupted run resumes:

1. ``train``: a GRPO run of the embedded SmolLM2-135M on the arithmetic problems of
   ``bench/sveb/problems.py`` (G sampled responses per problem, reward = answer check,
   advantages (R − mean) / (std + ε) per group, one AdamW step on −Σ_t A·log π(token_t) per
   batch), keeping the checkpoints of the steps named by ``--keep``.
2. ``states``: SVEB-style states (``bench/sveb/generate.py``) sampled from the LATEST
   policy: G responses per new problem and random states (response i, position t) whose
   target is the mean reward of K continuations, also from the latest policy.
3. ``table``: Hista (served defaults) on those groups, with the hidden states computed by
   the weights of ``age`` steps before the latest (the rewards and rollouts stay the latest
   policy's; only the weights that read them change). Per age: MAE against the Monte Carlo
   targets, ratio to the group mean's MAE, the paired difference of absolute errors against
   age 0 ± its standard error clustered by prompt, and the mean per-token KL(latest ‖ old)
   on the responses, which shows how far the weights moved.

Example::

    nice -n 19 python -m bench.staleness all --out runs/staleness --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sveb.problems import make_problem  # noqa: E402

TRAIN_FAMILIES = ("add", "sub", "mul")
AGES = (0, 1, 2, 4, 8, 16)
HISTA_LABEL = "hista (served defaults)"


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where the weights after ``step`` optimiser steps live (step 0: the start weights)."""
    return out / "checkpoints" / f"step-{step:03d}"


def complete(path: Path) -> bool:
    """A checkpoint directory whose weights were written to the end."""
    return (path / "DONE").exists()


def save_checkpoint(model: Any, tokenizer: Any, path: Path) -> None:
    """Weights + tokenizer, then a marker, so a cut write is never taken for a checkpoint."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "DONE").write_text("")


# -- phase 1: training -----------------------------------------------------------------


def group_log_probs(
    model: Any, prompt: torch.Tensor, responses: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(token) of every response token in one padded forward, and the padding mask.

    Both are (responses, longest response); padded positions hold 0 in the mask.
    """
    width = max(len(r) for r in responses)
    ids = torch.zeros((len(responses), width), dtype=torch.long)
    mask = torch.zeros((len(responses), width))
    for row, response in enumerate(responses):
        ids[row, : len(response)] = response
        mask[row, : len(response)] = 1.0
    n = prompt.shape[1]
    inputs = torch.cat([prompt.repeat(len(responses), 1), ids], 1)
    attention = torch.cat([torch.ones((len(responses), n)), mask], 1).long()
    logits = model(inputs, attention_mask=attention).logits[:, n - 1 : -1]
    log_probs = torch.log_softmax(logits.float(), -1).gather(2, ids[..., None])[..., 0]
    return log_probs * mask, mask


def train(args: argparse.Namespace) -> None:
    """The GRPO run; skipped when its last checkpoint and log exist."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from examples.grpo_loop import sample_problem
    from statevalue.backends.embedded import cached_embedded_checkpoint

    log_path = args.out / "train.jsonl"
    if complete(checkpoint_dir(args.out, args.steps)) and log_path.exists():
        print(f"training done: {checkpoint_dir(args.out, args.steps)}", flush=True)
        return
    base = cached_embedded_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    keep = {args.steps - age for age in parse_ints(args.ages) if age <= args.steps}
    if 0 in keep:
        save_checkpoint(model, tokenizer, checkpoint_dir(args.out, 0))
    rng = random.Random(f"staleness-train-{args.seed}")
    torch.manual_seed(args.seed)
    log_path.unlink(missing_ok=True)
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        model.eval()
        batch = []
        step_rewards = []
        for _ in range(args.prompts):
            problem = make_problem(rng.choice(TRAIN_FAMILIES), rng)
            prompt, responses, rewards = sample_problem(
                model, tokenizer, problem, args.group, args.max_new_tokens, args.temperature
            )
            step_rewards.extend(rewards)
            advantages = (np.array(rewards) - np.mean(rewards)) / (np.std(rewards) + 1e-4)
            batch.append((prompt, responses, advantages))
        tokens = sum(len(r) for _, rs, _ in batch for r in rs)
        # A group whose responses all got the same reward has zero advantages: no gradient.
        learning = [(p, rs, a) for p, rs, a in batch if np.any(a != 0)]
        model.train()
        optimizer.zero_grad()
        before = []
        for prompt, responses, advantages in learning:
            log_probs, mask = group_log_probs(model, prompt, responses)
            weights = torch.as_tensor(advantages, dtype=torch.float32)[:, None] * mask
            (-(weights * log_probs).sum() / tokens).backward()
            before.append(log_probs.detach()[mask.bool()])
        optimizer.step()
        model.eval()
        with torch.no_grad():
            after = [
                lp[mask.bool()]
                for lp, mask in (group_log_probs(model, p, rs) for p, rs, _ in learning)
            ]
        # log π_old − log π_new on tokens sampled from π_old: an estimate of KL(old ‖ new).
        step_kl = float(torch.cat(before).sub(torch.cat(after)).mean()) if learning else 0.0
        if step in keep:
            save_checkpoint(model, tokenizer, checkpoint_dir(args.out, step))
        entry = {
            "step": step,
            "reward": round(float(np.mean(step_rewards)), 4),
            "step_kl": round(step_kl, 5),
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(entry), flush=True)
        with log_path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


# -- phase 2: states from the latest policy --------------------------------------------


def states(args: argparse.Namespace) -> None:
    """SVEB-style records sampled from the latest checkpoint (``bench/sveb/generate.py``)."""
    from bench.sveb import generate

    latest = checkpoint_dir(args.out, args.steps)
    if not complete(latest):
        raise SystemExit(f"{latest} does not exist: run the train phase first")
    generate.main(
        [
            *("--out-dir", str(args.out / "states"), "--model", str(latest)),
            *("--threads", str(args.threads), "--seed", str(args.seed), "--no-progress"),
            *("--dev", "0", "--test", str(args.state_prompts), "--train", "0"),
            *("--families", ",".join(TRAIN_FAMILIES), "-G", str(args.state_group)),
            *("--states", str(args.states_per_prompt), "-K", str(args.mc)),
            *("--temperature", str(args.temperature), "--max-new-tokens", str(args.max_new_tokens)),
            *("--max-minutes", str(args.state_minutes)),
        ]
    )


# -- phase 3: Hista with old weights ---------------------------------------------------


def output_embedding(checkpoint: Path) -> torch.Tensor:
    """The checkpoint's unembedding matrix (the input embedding when the two are tied)."""
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    return tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])


def token_log_probs(
    hidden: Sequence[torch.Tensor], unembedding: torch.Tensor, record: dict[str, Any]
) -> list[np.ndarray]:
    """log π(response_t | ...) of every response token, from last-layer hidden states."""
    prompt_len = len(record["prompt_ids"])
    out = []
    for states_, response in zip(hidden, record["responses"], strict=True):
        ids = torch.as_tensor(response["ids"], dtype=torch.long)
        logits = states_[prompt_len - 1 : prompt_len - 1 + len(ids)].float() @ unembedding.T
        out.append(torch.log_softmax(logits, -1).gather(1, ids[:, None])[:, 0].numpy())
    return out


def age_values(args: argparse.Namespace, age: int, records: Sequence[dict[str, Any]]) -> dict:
    """Hista's value at every state and the response tokens' log-probs, with old weights.

    Cached per age in ``<out>/values/age-NNN.json``, by prompt: a grown set of states only
    computes its new groups.
    """
    from bench.sveb.evaluate import EngineSpec, InProcessSource, group_hidden
    from statevalue.backends.torch_backend import TorchBackend

    cache = args.out / "values" / f"age-{age:03d}.json"
    out = json.loads(cache.read_text()) if cache.exists() else {"groups": {}}
    todo = [record for record in records if record["id"] not in out["groups"]]
    if not todo:
        return out
    checkpoint = checkpoint_dir(args.out, args.steps - age)
    if not complete(checkpoint):
        raise SystemExit(f"{checkpoint} does not exist: train with this age in --ages")
    backend = TorchBackend(str(checkpoint), device="cpu")
    source = InProcessSource(backend)
    unembedding = output_embedding(checkpoint)
    spec = EngineSpec(HISTA_LABEL, "hista")  # the served defaults
    out["checkpoint_step"] = args.steps - age
    for record in todo:
        hidden = group_hidden(backend, record)
        values = source.values(record, [spec], hidden)[HISTA_LABEL]
        out["groups"][record["id"]] = {
            "estimates": [float(values[s["response"]][s["t"]]) for s in record["states"]],
            "log_probs": [lp.tolist() for lp in token_log_probs(hidden, unembedding, record)],
        }
        print(f"age {age}: {record['id']}", flush=True)
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(json.dumps(out))
    return out


def table(args: argparse.Namespace) -> str:
    """The staleness table (markdown) over every age, computing the ages not cached yet."""
    from bench.sveb.evaluate import load_records, paired_text, ratio_text
    from statevalue.calibration import clustered_mean

    records = [r for r in load_records(args.out / "states", "test") if r["states"]]
    by_age = {age: age_values(args, age, records) for age in parse_ints(args.ages)}
    clusters = [r["id"] for r in records for _ in r["states"]]
    targets = np.array([s["target"] for r in records for s in r["states"]])
    group_mean = np.array([np.mean(r["rewards"]) for r in records for _ in r["states"]])
    gm_mae = float(np.abs(group_mean - targets).mean())

    def estimates(age: int) -> np.ndarray:
        groups = by_age[age]["groups"]
        return np.array([e for r in records for e in groups[r["id"]]["estimates"]])

    def errors(age: int) -> np.ndarray:
        return np.abs(estimates(age) - targets)

    def log_probs(age: int) -> np.ndarray:
        groups = by_age[age]["groups"]
        return np.concatenate(
            [np.asarray(lp) for r in records for lp in groups[r["id"]]["log_probs"]]
        )

    # Without age 0 (a run computing only some ages) the columns against it stay empty.
    base = errors(0) if 0 in by_age else None
    latest = log_probs(0) if 0 in by_age else None
    gm, gm_se = clustered_mean(np.abs(group_mean - targets), clusters)
    lines = [
        "| weights age (steps) | checkpoint step | KL(latest ‖ old) per token "
        "| mean abs value change | Hista MAE ± SE | ratio to group mean | − age 0 ± SE |",
        "|---|---|---|---|---|---|---|",
    ]
    for age in sorted(by_age):
        err = errors(age)
        mae, se = clustered_mean(err, clusters)
        kl = "—" if latest is None else f"{np.mean(latest - log_probs(age)):.4f}"
        moved = "—" if base is None else f"{np.mean(np.abs(estimates(age) - estimates(0))):.4f}"
        lines.append(
            f"| {age} | {by_age[age]['checkpoint_step']} | {kl} | {moved} | {mae:.4f} ± {se:.4f} "
            f"| {ratio_text(mae, gm_mae)} | {paired_text(err, base, clusters)} |"
        )
    lines.append(f"| group mean (no weights) | — | — | — | {gm:.4f} ± {gm_se:.4f} | 1.000 | — |")
    rewards = [w for r in records for w in r["rewards"]]
    summary = (
        f"{len(records)} prompts × G = {len(records[0]['rewards'])}, {len(targets)} states, "
        f"K = {len(records[0]['states'][0]['continuation_rewards'])} continuations each; "
        f"pass rate of the latest policy {np.mean(rewards):.3f}"
    )
    return f"{header()}\n- {summary}\n\n" + "\n".join(lines)


def header() -> str:
    """Date, machine and the exact command."""
    command = " ".join(["python", "-m", "bench.staleness", *map(shlex.quote, sys.argv[1:])])
    return (
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}\n"
        f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, CPU\n"
        f"- command: `{command}`"
    )


def parse_ints(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``."""
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("phase", choices=("train", "states", "table", "all"))
    parser.add_argument("--out", type=Path, default=Path("runs/staleness"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling, every phase")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="every phase")
    train_group = parser.add_argument_group("train")
    train_group.add_argument("--steps", type=int, default=16)
    train_group.add_argument("--prompts", type=int, default=2, help="problems per step")
    train_group.add_argument("--group", type=int, default=8, help="responses per problem")
    train_group.add_argument("--lr", type=float, default=4e-5)
    states_group = parser.add_argument_group("states")
    states_group.add_argument("--state-prompts", type=int, default=40, help="new problems")
    states_group.add_argument("--state-group", type=int, default=8, help="responses (G)")
    states_group.add_argument("--states-per-prompt", type=int, default=4)
    states_group.add_argument(
        "--state-minutes",
        type=float,
        default=0.0,
        help="stop sampling after this long (0: no limit)",
    )
    states_group.add_argument("--mc", "-K", type=int, default=4, help="continuations per state")
    parser.add_argument(
        "--ages", default=",".join(map(str, AGES)), help="weight ages in steps (kept, compared)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the phases asked for; returns the process exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("train", "all"):
        train(args)
    if args.phase in ("states", "all"):
        states(args)
    if args.phase in ("table", "all"):
        text = table(args)
        (args.out / "table.md").write_text(text + "\n")
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
