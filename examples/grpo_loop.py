"""A GRPO-style RL loop on CPU whose advantages come from a statevalue server.

    python -m examples.grpo_loop --steps 8 --methods group_mean,hista,numca --out runs/

For each method, from the same start weights and the same seeds: sample G responses to a
batch of arithmetic word problems with the embedded SmolLM2-135M, reward = answer check,
ask the server for per-token advantages, take one policy-gradient step
(−Σ_t A_t · log π(token_t)), save the weights and reload them into the server, so the
next step's hidden states (Hista) come from the updated policy. Logs reward per step as
JSON lines and draws the reward curves of all methods into ``rewards.png``.

The script starts its own server (``statevalue serve`` on the exported checkpoint, with
an admin token for reloads) unless ``--target`` names one that serves the same weights.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.sveb.problems import Problem, make_problem, reward
from statevalue.backends.embedded import export_embedded_checkpoint
from statevalue_client import Group, Rollout, ValueClient

FAMILIES = ("add", "sub", "mul")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(checkpoint: Path, token: str) -> tuple[subprocess.Popen[bytes], str]:
    grpc_port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "statevalue.cli",
            "serve",
            "--model",
            str(checkpoint),
            "--device",
            "cpu",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--admin-token",
            token,
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/readyz").status_code == 200:
                return process, f"127.0.0.1:{grpc_port}"
        except httpx.HTTPError:
            pass
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def sample(
    model: AutoModelForCausalLM,
    prompt: torch.Tensor,
    g: int,
    max_new_tokens: int,
    eos: int,
    temperature: float = 1.0,
) -> list[torch.Tensor]:
    """G responses to one prompt, each cut after its EOS."""
    with torch.no_grad():
        out = model.generate(
            prompt.repeat(g, 1),
            attention_mask=torch.ones(g, prompt.shape[1], dtype=torch.long),
            do_sample=True,
            temperature=temperature,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=eos,
        )
    responses = []
    for row in out[:, prompt.shape[1] :]:
        stop = (row == eos).nonzero()
        responses.append(row[: int(stop[0]) + 1] if len(stop) else row)
    return responses


def sample_problem(
    model: AutoModelForCausalLM,
    tokenizer: AutoTokenizer,
    problem: Problem,
    g: int,
    max_new_tokens: int,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor], list[float]]:
    """The chat prompt of one problem, G sampled responses and their rewards."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    responses = sample(model, prompt, g, max_new_tokens, tokenizer.eos_token_id, temperature)
    rewards = [
        reward(tokenizer.decode(r, skip_special_tokens=True), problem.answer) for r in responses
    ]
    return prompt, responses, rewards


def response_log_probs(
    model: AutoModelForCausalLM, prompt: torch.Tensor, response: torch.Tensor
) -> torch.Tensor:
    """log π(response_t | prompt, response_<t) for every response token."""
    ids = torch.cat([prompt[0], response])[None]
    logits = model(ids).logits[0, prompt.shape[1] - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, response[:, None])[:, 0]


def run(
    args: argparse.Namespace, method: str, base: Path, client: ValueClient, token: str
) -> list[dict]:
    """One training run from the base weights; returns the per-step log."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    work = args.out / f"weights-{method}"
    client.reload_weights(str(base), admin_token=token, version=f"{method}-start")
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    log = []
    for step in range(1, args.steps + 1):
        started = time.perf_counter()
        problems = [make_problem(rng.choice(FAMILIES), rng) for _ in range(args.prompts)]
        model.eval()
        batch = [
            sample_problem(model, tokenizer, problem, args.group, args.max_new_tokens)
            for problem in problems
        ]
        groups = [
            Group(prompt[0].numpy(), [Rollout(r.numpy(), w) for r, w in zip(rs, ws, strict=True)])
            for prompt, rs, ws in batch
        ]
        result = client.estimate(groups, (method,), hista={"node_spacing": 10})
        model.train()
        optimizer.zero_grad()
        tokens = sum(len(r) for _, rs, _ in batch for r in rs)
        for (prompt, responses, _), group in zip(batch, result.groups, strict=True):
            for response, rollout in zip(responses, group.rollouts, strict=True):
                advantages = torch.from_numpy(np.array(rollout.advantages[method]))
                loss = -(advantages * response_log_probs(model, prompt, response)).sum() / tokens
                loss.backward()
        optimizer.step()
        model.save_pretrained(work)
        client.reload_weights(str(work), admin_token=token, version=f"{method}-step-{step}")
        entry = {
            "method": method,
            "step": step,
            "reward": float(np.mean([w for _, _, ws in batch for w in ws])),
            "model_revision": result.model.revision,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(json.dumps(entry), flush=True)
        log.append(entry)
    shutil.rmtree(work, ignore_errors=True)
    return log


def plot(logs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, log in logs.items():
        ax.plot([e["step"] for e in log], [e["reward"] for e in log], marker="o", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the step's samples")
    ax.set_title("GRPO on SmolLM2-135M (CPU), advantages from statevalue")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="group_mean,hista,numca")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4, help="problems per step")
    parser.add_argument("--group", type=int, default=8, help="responses per problem (G)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--target", help="a running server with --admin-token (default: start one)")
    parser.add_argument("--admin-token", default=None)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "base"
    if not (base / "model.safetensors").exists():
        export_embedded_checkpoint(base)
    token = args.admin_token or secrets.token_hex(16)
    server = None
    target = args.target
    if target is None:
        server, target = start_server(base, token)
    logs: dict[str, list[dict]] = {}
    try:
        with ValueClient(target, timeout=600) as client:
            for method in args.methods.split(","):
                logs[method] = run(args, method, base, client, token)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)
    with (args.out / "rewards.jsonl").open("w") as handle:
        for log in logs.values():
            for entry in log:
                handle.write(json.dumps(entry) + "\n")
    plot(logs, args.out / "rewards.png")
    print(f"wrote {args.out / 'rewards.jsonl'} and {args.out / 'rewards.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
