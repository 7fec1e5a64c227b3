"""Throughput and latency of statevalue against the bare forward pass of its model, any device.

    python -m bench.perf                                   # embedded model on CPU
    python -m bench.perf --smoke                           # tiny configuration, seconds
    python -m bench.perf --device cuda --random-init qwen2.5-1.5b \\
        --prompt-tokens 256 --sizes 16x1024,16x4096        # a GPU, no download
    .venv-vllm/bin/python -m bench.perf --backend torch,vllm   # vLLM rows beside torch's

Per configuration (G responses of about T tokens after one shared prompt of P tokens):
  bare forward     one plain transformers decoder call on the right-padded group: the
                   reference every other row is a ratio to (tokens/s over all G·(P+T) tokens)
  bare prompt-once the same decoder: the prompt once with a KV cache repeated G times, then
                   the responses on it; "ideal" beside it is G·(P+T) / (P + G·T), what
                   counting the prompt once could give at the bare forward's speed
  <b> <path>       the backend's hidden_states on each of its forward paths (torch:
                   padded, packed, prompt_once; vllm: packed, prompt_once through its
                   prefix cache), with the group's prompt hinted
  <b> engine       Engine.estimate in-process, all methods, the backend's default path
  <b> grpc xN, http through a `statevalue serve --backend <b>` subprocess, same model/device
  numca / hista    the estimators alone, as a share of the bare forward
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import inspect
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from statevalue.backends.embedded import EMBEDDED_MODEL, embedded_model_file
from statevalue.backends.torch_backend import (
    FORWARD_PATHS,
    TorchBackend,
    resolve_device,
    resolve_dtype,
)
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput

# Llama-architecture shapes for --random-init; the vocabulary is the embedded tokenizer's.
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-1.5B's width, depth, heads and MLP (its own vocabulary is not needed here).
    "qwen2.5-1.5b": {
        "hidden_size": 1536,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "intermediate_size": 8960,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
    },
    # A few-MB model for smoke runs of the random-init path.
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 8192,
        "rope_theta": 1e4,
    },
}


@dataclass
class Row:
    name: str
    tokens_per_s: float
    latencies: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def random_init_checkpoint(shape: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-weight Llama model of a named shape with the embedded tokenizer.

    Weights are saved in bfloat16 (half the disk of float32; a float32 run upcasts them).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    gguf = embedded_model_file()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fields = dict(SHAPES[shape])
    rope_theta = fields.pop("rope_theta")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **fields,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load_decoder(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    """The bare transformers decoder, loaded on its own (not through the backend)."""
    from transformers import AutoModelForCausalLM

    if model == EMBEDDED_MODEL:
        gguf = embedded_model_file()
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        source, kwargs = model, {}
    causal_lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    return causal_lm.eval().to(device).get_decoder()


def make_group(rng: np.random.Generator, g: int, p: int, t: int, vocab: int) -> GroupInput:
    """G random responses of T/2..T tokens (mixed lengths, like real rollouts) after P tokens.

    Timing does not depend on which ids they are.
    """
    prompt = rng.integers(100, vocab, p).astype(np.int32)
    return GroupInput(
        prompt_ids=prompt,
        rollouts=[
            RolloutInput(
                response_ids=rng.integers(100, vocab, int(rng.integers(t // 2, t + 1))).astype(
                    np.int32
                ),
                reward=float(rng.integers(0, 2)),
            )
            for _ in range(g)
        ],
    )


def group_tokens(group: GroupInput) -> int:
    return sum(len(group.prompt_ids) + len(r.response_ids) for r in group.rollouts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - start)
    return out


def in_process(
    name: str, fn: Callable[[], object], tokens: int, repeats: int, device: torch.device
) -> Row:
    """A row timed in this process after one warm-up call."""
    fn()
    latencies = timed(fn, repeats, device)
    return Row(name, tokens * len(latencies) / sum(latencies), latencies)


def bare_forward(decoder: Any, group: GroupInput, device: torch.device) -> Callable[[], object]:
    """One decoder call on the right-padded group, as a trainer would run it."""
    prompt = torch.as_tensor(group.prompt_ids, dtype=torch.long)
    rows = [torch.cat([prompt, torch.as_tensor(r.response_ids, dtype=torch.long)])
            for r in group.rollouts]  # fmt: skip
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run() -> object:
        with torch.inference_mode():
            return decoder(input_ids=ids, attention_mask=mask).last_hidden_state

    return run


def bare_prompt_once(decoder: Any, group: GroupInput, device: torch.device) -> Callable[[], object]:
    """The prompt once with a KV cache, the cache repeated per rollout, the responses on it."""
    prompt = torch.as_tensor(group.prompt_ids, dtype=torch.long, device=device)[None]
    responses = [torch.as_tensor(r.response_ids, dtype=torch.long) for r in group.rollouts]
    width = max(len(r) for r in responses)
    ids = torch.zeros((len(responses), width), dtype=torch.long)
    mask = torch.zeros((len(responses), prompt.shape[1] + width), dtype=torch.long)
    mask[:, : prompt.shape[1]] = 1
    for i, response in enumerate(responses):
        ids[i, : len(response)] = response
        mask[i, prompt.shape[1] : prompt.shape[1] + len(response)] = 1
    ids, mask = ids.to(device), mask.to(device)
    # Newer transformers call it `cache`, earlier 5.x releases `past_key_values`.
    forward_args = inspect.signature(decoder.forward).parameters
    cache_argument = "cache" if "cache" in forward_args else "past_key_values"

    def run() -> object:
        with torch.inference_mode():
            cache = decoder(input_ids=prompt, use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(responses))
            return decoder(
                input_ids=ids, attention_mask=mask, **{cache_argument: cache}
            ).last_hidden_state

    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`statevalue serve` in a subprocess, on free loopback ports; ``flags`` are added."""

    def __init__(
        self, model: str, device: str, dtype: str, max_batch_tokens: int, *flags: str
    ) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "statevalue.cli", "serve", "--model", model,
            "--device", device, "--dtype", dtype,
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--max-batch-tokens", str(max_batch_tokens),
            # Timed clients queue on purpose: nothing is refused for its estimated wait.
            "--max-queue-wait-s", "3600", *flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError("the server exited during start-up")
            time.sleep(0.5)
        raise TimeoutError("the server did not become ready")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def grpc_row(
    target: str, groups: Sequence[GroupInput], clients: int, repeats: int
) -> tuple[float, list[float]]:
    """Tokens/s and per-request latencies with ``clients`` concurrent async clients."""
    from statevalue_client import AsyncValueClient, Group, Rollout

    wire = [
        Group(
            prompt_ids=g.prompt_ids,
            rollouts=[Rollout(r.response_ids, r.reward) for r in g.rollouts],
        )
        for g in groups
    ]

    async def one_client(client: AsyncValueClient, index: int, out: list[float]) -> None:
        for _ in range(repeats):
            start = time.perf_counter()
            await client.estimate([wire[index % len(wire)]])
            out.append(time.perf_counter() - start)

    async def run() -> tuple[float, list[float]]:
        latencies: list[float] = []
        async with AsyncValueClient(target, timeout=600) as client:
            await client.estimate([wire[0]])  # connect and warm up
            start = time.perf_counter()
            await asyncio.gather(*(one_client(client, i, latencies) for i in range(clients)))
            elapsed = time.perf_counter() - start
        tokens = sum(group_tokens(groups[i % len(groups)]) for i in range(clients)) * repeats
        return tokens / elapsed, latencies

    return asyncio.run(run())


def http_row(port: int, group: GroupInput, repeats: int) -> tuple[float, list[float]]:
    body = {
        "groups": [
            {
                "prompt_ids": group.prompt_ids.tolist(),
                "rollouts": [
                    {"response_ids": r.response_ids.tolist(), "reward": r.reward}
                    for r in group.rollouts
                ],
            }
        ]
    }
    url = f"http://127.0.0.1:{port}/v1/estimate"
    with httpx.Client(timeout=600) as client:
        client.post(url, json=body).raise_for_status()
        latencies = [0.0] * repeats
        for i in range(repeats):
            start = time.perf_counter()
            client.post(url, json=body).raise_for_status()
            latencies[i] = time.perf_counter() - start
    return group_tokens(group) * repeats / sum(latencies), latencies


def machine(device: torch.device) -> str:
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores{gpu}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}"
    )


def open_backends(args: argparse.Namespace, model: str) -> dict[str, Any]:
    """The backends ``--backend`` names (TorchBackend, VllmBackend), on the model under test."""
    backends: dict[str, Any] = {}
    for kind in args.backend.split(","):
        if kind == "torch":
            backends[kind] = TorchBackend(
                model, device=args.device, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens
            )
        elif kind == "vllm":
            from statevalue.backends.vllm_backend import VllmBackend

            backends[kind] = VllmBackend(model, device=args.device, dtype=args.dtype)
        else:
            raise SystemExit(f"--backend: torch or vllm, not {kind!r}")
    return backends


def forward_paths(backend: Any) -> tuple[str, ...]:
    if isinstance(backend, TorchBackend):
        return FORWARD_PATHS
    from statevalue.backends.vllm_backend import VLLM_FORWARD_PATHS

    return VLLM_FORWARD_PATHS


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="'embedded' or a model directory")
    parser.add_argument(
        "--random-init", choices=sorted(SHAPES), default=None,
        help="a random-weight Llama model of this shape with the embedded tokenizer",
    )  # fmt: skip
    parser.add_argument(
        "--backend", default="torch",
        help="torch, vllm or both (torch,vllm): whose rows to time beside the bare forward",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--prompt-tokens", type=int, default=48, help="shared prompt length P")
    parser.add_argument("--sizes", default="8x128,16x128", help="GxT list, up to 16x4096")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per row/client")
    parser.add_argument("--clients", default="1,8", help="concurrent gRPC clients per row")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--no-server", action="store_true", help="in-process rows only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--json", type=str, default=None, help="also write rows to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.clients, args.prompt_tokens = "2x16", 1, "1,2", 8
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory(prefix="statevalue-perf-") as scratch:
        model = args.model
        if args.random_init is not None:
            model = str(random_init_checkpoint(args.random_init, Path(scratch) / args.random_init))
        backends = open_backends(args, model)
        first = next(iter(backends.values()))
        name = f"random-init {args.random_init}" if args.random_init else first.identity.name
        dtype = resolve_dtype(args.dtype, device)
        print(f"# statevalue perf, {datetime.date.today()}, {machine(device)}")
        paths = ", ".join(f"{kind} (default path {b.forward_path})" for kind, b in backends.items())
        print(f"# model {name}, device {device}, dtype {str(dtype).split('.')[-1]}, "
              f"prompt {args.prompt_tokens} tokens, responses T/2..T tokens")  # fmt: skip
        print(f"# backends {paths}")
        print(f"# command: python -m bench.perf {shlex.join(argv or sys.argv[1:])}")
        decoder = load_decoder(model, device, dtype)
        servers: dict[str, ServerProcess] = {}
        try:
            if not args.no_server:
                for kind in backends:
                    servers[kind] = ServerProcess(
                        model, args.device, args.dtype, args.max_batch_tokens, "--backend", kind
                    )
            results = run_sizes(args, sizes, client_counts, backends, decoder, servers)
        finally:
            for server in servers.values():
                server.close()
            for backend in backends.values():
                backend.close()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


def run_sizes(
    args: argparse.Namespace,
    sizes: Sequence[tuple[int, ...]],
    client_counts: Sequence[int],
    backends: dict[str, Any],
    decoder: Any,
    servers: dict[str, ServerProcess],
) -> list[dict[str, Any]]:
    device = resolve_device(args.device)
    engines = {kind: Engine(backend) for kind, backend in backends.items()}
    first = next(iter(engines.values()))
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    header = (
        f"{'config':<10} {'row':<24} {'tokens/s':>9} {'x bare':>7} "
        f"{'p50 s':>8} {'p95 s':>8} {'p99 s':>8}"
    )
    print(header)
    print("-" * len(header))
    for g, t in sizes:
        config = f"{g}x{t}"
        groups = [make_group(rng, g, args.prompt_tokens, t, first.backend.vocab_size)
                  for _ in range(max(client_counts))]  # fmt: skip
        group = groups[0]
        tokens = group_tokens(group)
        once = len(group.prompt_ids) + sum(len(r.response_ids) for r in group.rollouts)
        request = EstimateRequest(groups=[group])
        prepared = first.prepare(request)
        sequences, hints = prepared.sequences(), prepared.prefix_lengths()

        rows = [
            in_process("bare forward", bare_forward(decoder, group, device), tokens, args.repeats,
                       device),
            in_process("bare prompt-once", bare_prompt_once(decoder, group, device), tokens,
                       args.repeats, device),
        ]  # fmt: skip
        for kind, backend in backends.items():
            default_path = backend.forward_path
            for path in forward_paths(backend):
                backend.forward_path = path
                call = lambda b=backend, s=sequences, h=hints: b.hidden_states(s, h)  # noqa: E731
                rows.append(in_process(f"{kind} {path}", call, tokens, args.repeats, device))
            backend.forward_path = default_path
            call = lambda e=engines[kind], req=request: e.estimate(req)  # noqa: E731
            rows.append(in_process(f"{kind} engine", call, tokens, args.repeats, device))
            server = servers.get(kind)
            if server is not None:
                target = f"127.0.0.1:{server.grpc_port}"
                for n in client_counts:
                    rate, lat = grpc_row(target, groups, n, args.repeats)
                    rows.append(Row(f"{kind} grpc x{n}", rate, lat))
                rate, lat = http_row(server.http_port, group, args.repeats)
                rows.append(Row(f"{kind} http", rate, lat))
        base = rows[0].tokens_per_s
        for r in rows:
            note = f"   ideal {tokens / once:.2f}" if r.name == "bare prompt-once" else ""
            print(f"{config:<10} {r.name:<24} {r.tokens_per_s:>9.0f} "
                  f"{r.tokens_per_s / base:>7.2f} {r.percentile(50):>8.3f} "
                  f"{r.percentile(95):>8.3f} {r.percentile(99):>8.3f}{note}")  # fmt: skip
            results.append({"config": config, **r.__dict__, "ratio": r.tokens_per_s / base})
        hidden = first.backend.hidden_states(sequences, hints)
        bare = float(np.median(rows[0].latencies))
        for method in ("numca", "hista"):
            only = first.prepare(EstimateRequest(groups=[group], methods=(method,)))
            states = hidden if method == "hista" else None
            spent = timed(lambda p=only, h=states: first.compute(p, h), args.repeats, device)
            share = float(np.median(spent)) / bare
            print(f"{config:<10} {method + ' alone':<24} {'':>9} {'':>7} "
                  f"{np.median(spent):>8.4f}  = {share:.1%} of the bare forward")  # fmt: skip
            results.append({"config": config, "name": f"{method} alone",
                            "seconds": float(np.median(spent)), "share": share})  # fmt: skip
    return results


if __name__ == "__main__":
    sys.exit(main())
