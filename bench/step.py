"""A whole RL step (many groups of G rollouts) through the client, on 1 and 2 replicas.

    python -m bench.step                 # 1024 groups, G = 8 (numca + group mean);
                                         # Hista on 128 of them
    python -m bench.step --smoke         # tiny configuration, seconds (runs in the tests)
    python -m bench.step --max-queue-wait-s 5 --max-connection-age-s 20
                                         # a step that outlasts the replicas' time limits

The replicas are `statevalue serve` subprocesses on loopback with a small per-request
token limit, so ValueClient.estimate splits the step into many requests and sends them
concurrently (round robin over the replicas), with the client's defaults: no deadline,
requests of a few seconds of server work, retries after the servers' Retry-After. Per
row: the step's wall time, the time to its first progress report, tokens/s, the model's
forward time summed over the replicas (from their /metrics), and the share of the wall
time the replicas spent in the model ("busy": forward time / (replicas × wall time); the
rest is client splitting and reassembly, serialisation, transport, queueing, estimators).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from collections.abc import Sequence

import httpx
import numpy as np
import torch

from bench.perf import EMBEDDED_MODEL, ServerProcess, machine
from statevalue_client import Group, Rollout, ValueClient

PROMPT_TOKENS = 16
RESPONSE_TOKENS = (8, 25)  # short responses by default: uniform lengths in [8, 25)


GROUPS_PER_PROMPT = 4  # with --numca-store: groups sharing one prompt_id


def make_step(
    groups: int,
    g: int,
    seed: int = 0,
    prompt_ids: bool = False,
    response_tokens: tuple[int, int] = RESPONSE_TOKENS,
) -> list[Group]:
    """Random prompts and responses (timing does not depend on which ids) with 0/1 rewards;
    response lengths uniform in ``[response_tokens[0], response_tokens[1])``; with
    ``prompt_ids``, every GROUPS_PER_PROMPT groups share a prompt_id (of this seed)."""
    rng = np.random.default_rng(seed)
    return [
        Group(
            prompt_ids=rng.integers(100, 40000, PROMPT_TOKENS).astype(np.int32),
            rollouts=[
                Rollout(
                    rng.integers(100, 40000, rng.integers(*response_tokens)).astype(np.int32),
                    float(rng.integers(0, 2)),
                )
                for _ in range(g)
            ],
            group_id=f"g{i}",
            prompt_id=f"s{seed}-p{i // GROUPS_PER_PROMPT}" if prompt_ids else "",
        )
        for i in range(groups)
    ]


def step_tokens(groups: Sequence[Group]) -> int:
    return sum(len(g.prompt_ids) + len(r.response_ids) for g in groups for r in g.rollouts)


def forward_seconds(server: ServerProcess) -> float:
    """The server's total time in the model so far (statevalue_forward_seconds_sum)."""
    page = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text
    for line in page.splitlines():
        if line.startswith("statevalue_forward_seconds_sum"):
            return float(line.split()[1])
    return 0.0


def run_row(
    servers: Sequence[ServerProcess], groups: list[Group], methods: tuple[str, ...], **params: dict
) -> tuple[float, float, list[float], int]:
    """Wall seconds of one step, seconds to its first progress, each replica's forward
    seconds in it, requests sent."""
    target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers)
    with ValueClient(target) as client:
        client.estimate(groups[:1], methods, **params)  # connect to every replica, warm up
        before = [forward_seconds(s) for s in servers]
        reports: list[tuple[float, int]] = []
        start = time.perf_counter()
        result = client.estimate(
            groups,
            methods,
            progress=lambda p: reports.append((time.perf_counter(), p.requests_total)),
            **params,
        )
        wall = time.perf_counter() - start
    assert len(result.groups) == len(groups)
    forward = [forward_seconds(s) - b for s, b in zip(servers, before, strict=True)]
    return wall, reports[0][0] - start, forward, reports[-1][1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1024, help="groups in the numca step")
    parser.add_argument("--hista-groups", type=int, default=128, help="groups in the hista step")
    parser.add_argument("--g", type=int, default=8, help="rollouts per group")
    parser.add_argument(
        "--max-request-tokens", type=int, default=8192, help="the replicas' per-request limit"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per replica (OMP_NUM_THREADS)"
    )
    parser.add_argument(
        "--numca-store",
        default=None,
        help="the replicas' Numca store (e.g. redis://127.0.0.1:6379/0); groups then carry "
        f"prompt_ids, {GROUPS_PER_PROMPT} groups per prompt, so Numca adds to and reads it",
    )
    parser.add_argument(
        "--response-tokens",
        default=f"{RESPONSE_TOKENS[0]},{RESPONSE_TOKENS[1]}",
        help="response lengths, uniform in [MIN, MAX) (default %(default)s)",
    )
    parser.add_argument(
        "--replicas", default="1,2", help="replica counts to run each step on (default 1,2)"
    )
    parser.add_argument(
        "--max-queue-wait-s", type=float, default=None, help="the replicas' admission bound"
    )
    parser.add_argument(
        "--max-connection-age-s", type=float, default=None, help="the replicas' connection age"
    )
    parser.add_argument(
        "--model", default=EMBEDDED_MODEL, help="'embedded' (default) or a model directory"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the replicas' torch
    if args.smoke:
        args.groups, args.hista_groups, args.g, args.max_request_tokens = 24, 6, 2, 256

    print(f"# statevalue step, {datetime.date.today()}, {machine(torch.device('cpu'))}, device cpu")
    print(f"# command: python -m bench.step {shlex.join(argv or sys.argv[1:])}")
    print(f"# replicas: torch threads {os.environ.get('OMP_NUM_THREADS', 'default')} each")
    flags: tuple[str, ...] = ("--max-request-tokens", str(args.max_request_tokens))
    if args.numca_store:
        flags += ("--numca-store", args.numca_store)
        print(f"# Numca store: {args.numca_store}, {GROUPS_PER_PROMPT} groups per prompt_id")
    for flag, value in (
        ("--max-queue-wait-s", args.max_queue_wait_s),
        ("--max-connection-age-s", args.max_connection_age_s),
    ):
        if value is not None:
            flags += (flag, str(value))
            print(f"# replicas: {flag} {value:g}")
    low, high = (int(n) for n in args.response_tokens.split(","))
    counts = [int(n) for n in args.replicas.split(",")]
    servers = [
        ServerProcess(args.model, "cpu", "auto", args.max_batch_tokens, *flags)
        for _ in range(max(counts))
    ]
    header = (
        f"{'step':<26} {'replicas':>8} {'requests':>8} {'tokens':>8} {'wall s':>8} "
        f"{'first s':>8} {'tokens/s':>9} {'forward s':>9} {'busy':>6}"
    )
    print(header)
    print("-" * len(header))
    rows = [
        (f"numca+group_mean {args.groups}x{args.g}", args.groups, ("numca", "group_mean"), {}),
        (f"hista {args.hista_groups}x{args.g}", args.hista_groups, ("hista",), {}),
    ]
    try:
        for name, count, methods, params in rows:
            for replicas in counts:
                # A fresh step per row: with a store, nothing is counted already.
                groups = make_step(count, args.g, replicas, bool(args.numca_store), (low, high))
                tokens = step_tokens(groups)
                wall, first, forward, requests = run_row(
                    servers[:replicas], groups, methods, **params
                )
                busy = sum(forward) / (replicas * wall)
                print(
                    f"{name:<26} {replicas:>8} {requests:>8} {tokens:>8} {wall:>8.2f} "
                    f"{first:>8.2f} {tokens / wall:>9.0f} {sum(forward):>9.2f} {busy:>6.1%}"
                )
    finally:
        for server in servers:
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
