"""Throughput and latency of statevalue against the bare forward pass of its model.

    python -m bench.perf                 # full table (groups of 8/16 x 128/512 tokens)
    python -m bench.perf --smoke         # tiny configuration, seconds (runs in the tests)

Rows per configuration (G responses of T tokens after a shared prompt):
  (a) forward   the bare forward pass of the model in-process: the limit of this hardware
  (b) engine    Engine.estimate in-process (all methods)
  (c) grpc xN   through a `statevalue serve` subprocess with N concurrent clients
  (d) http      POST /v1/estimate to the same server, one client
and the estimators alone (Numca, Hista) as a fraction of the forward pass.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
import torch

from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput

PROMPT_TOKENS = 48


@dataclass
class Row:
    name: str
    tokens_per_s: float
    latencies: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def make_group(rng: np.random.Generator, g: int, t: int, vocab: int = 49152) -> GroupInput:
    """G random responses of T tokens: timing does not depend on which ids they are."""
    prompt = rng.integers(100, vocab, PROMPT_TOKENS).astype(np.int32)
    return GroupInput(
        prompt_ids=prompt,
        rollouts=[
            RolloutInput(
                response_ids=rng.integers(100, vocab, t).astype(np.int32),
                reward=float(rng.integers(0, 2)),
            )
            for _ in range(g)
        ],
    )


def group_tokens(group: GroupInput) -> int:
    return sum(len(group.prompt_ids) + len(r.response_ids) for r in group.rollouts)


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """`statevalue serve` in a subprocess, on free loopback ports; ``flags`` are added."""

    def __init__(self, max_batch_tokens: int, *flags: str) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        command = [
            sys.executable, "-m", "statevalue.cli", "serve", "--device", "cpu",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            "--max-batch-tokens", str(max_batch_tokens), *flags,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 300
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
        return group_tokens(groups[0]) * clients * repeats / elapsed, latencies

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
        latencies = timed(lambda: client.post(url, json=body).raise_for_status(), repeats)
    return group_tokens(group) * repeats / sum(latencies), latencies


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"python {platform.python_version()}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8x128,8x512,16x128,16x512", help="GxT list")
    parser.add_argument("--repeats", type=int, default=3, help="timed requests per row/client")
    parser.add_argument("--clients", default="1,8", help="concurrent gRPC clients per row")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--no-server", action="store_true", help="in-process rows only")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat")
    parser.add_argument("--json", type=str, default=None, help="also write rows to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.sizes, args.repeats, args.clients = "2x16", 1, "1,2"
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    client_counts = [int(c) for c in args.clients.split(",")]

    print(f"# statevalue perf, {datetime.date.today()}, {machine()}, device cpu")
    print(f"# command: python -m bench.perf {shlex.join(argv or sys.argv[1:])}")
    backend = TorchBackend("embedded", device="cpu", max_batch_tokens=args.max_batch_tokens)
    engine = Engine(backend)
    server = None if args.no_server else ServerProcess(args.max_batch_tokens)
    rng = np.random.default_rng(0)
    results = []
    header = (
        f"{'config':<10} {'row':<14} {'tokens/s':>9} {'x (a)':>6} "
        f"{'p50 s':>7} {'p95 s':>7} {'p99 s':>7}"
    )
    print(header)
    print("-" * len(header))
    try:
        for g, t in sizes:
            groups = [make_group(rng, g, t) for _ in range(max(client_counts))]
            group = groups[0]
            tokens = group_tokens(group)
            request = EstimateRequest(groups=[group])
            prepared = engine.prepare(request)
            sequences = prepared.sequences()
            backend.hidden_states(sequences)  # warm-up
            rows: list[Row] = []
            forward = timed(lambda seqs=sequences: backend.hidden_states(seqs), args.repeats)
            rows.append(Row("(a) forward", tokens * len(forward) / sum(forward), forward))
            engine_lat = timed(lambda req=request: engine.estimate(req), args.repeats)
            rows.append(Row("(b) engine", tokens * len(engine_lat) / sum(engine_lat), engine_lat))
            if server is not None:
                target = f"127.0.0.1:{server.grpc_port}"
                for n in client_counts:
                    rate, lat = grpc_row(target, groups, n, args.repeats)
                    rows.append(Row(f"(c) grpc x{n}", rate, lat))
                rate, lat = http_row(server.http_port, group, args.repeats)
                rows.append(Row("(d) http", rate, lat))
            base = rows[0].tokens_per_s
            for row in rows:
                print(
                    f"{g}x{t:<8} {row.name:<14} {row.tokens_per_s:>9.0f} "
                    f"{row.tokens_per_s / base:>6.2f} {row.percentile(50):>7.3f} "
                    f"{row.percentile(95):>7.3f} {row.percentile(99):>7.3f}"
                )
                results.append({"config": f"{g}x{t}", **row.__dict__})
            hidden = backend.hidden_states(sequences)
            fwd = float(np.median(forward))
            for method in ("numca", "hista"):
                only = EstimateRequest(groups=[group], methods=(method,))
                prepared = engine.prepare(only)
                states = hidden if method == "hista" else None
                spent = timed(lambda p=prepared, h=states: engine.compute(p, h), args.repeats)
                share = float(np.median(spent)) / fwd
                print(f"{g}x{t:<8} {method + ' alone':<14} {'':>9} {'':>6} "
                      f"{np.median(spent):>7.4f}  = {share:.1%} of the forward pass")  # fmt: skip
                results.append({"config": f"{g}x{t}", "name": f"{method} alone",
                                "seconds": float(np.median(spent)), "share": share})  # fmt: skip
    finally:
        if server is not None:
            server.close()
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
