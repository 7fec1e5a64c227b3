"""One weight update of the embedded model on 1 and 2 CPU replicas: by disk, and from the
trainer's memory over gloo and through shared memory.

    python -m bench.weights                # 3 updates per row
    python -m bench.weights --repeats 1    # quicker
    python -m bench.weights --threads 1    # one torch thread per process
    .venv-vllm/bin/python -m bench.weights --backend vllm --replicas 1   # vLLM replicas

The replicas are `statevalue serve` subprocesses on loopback serving a float32 export of
the embedded model; the trainer is this process, holding the same model in transformers.
Before each update the trainer moves every weight a little (new weights each time). Rows:

- disk: ``save_pretrained`` into a directory, then ``reload_weights`` on every replica
  (save and reload timed apart; the files are read back from the page cache, the best case
  for a disk);
- gloo, first: ``update_weights``, including setting up the process group;
- gloo: the next updates, reusing it;
- shared memory: ``update_weights(transport="shared_memory")``, the replicas being on
  this machine: one copy into a shared-memory segment, one copy out of it per replica.

Per row: the bytes of one update, its median wall time, the model's bytes over that time
(GB/s), and how long each replica's model thread was swapping weights, when no forward
step can run (from the replicas' ``statevalue_weight_swap_seconds``). A second table
extrapolates the measured GB/s to the bf16 bytes of larger policies.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import torch

from bench.perf import ServerProcess, machine
from statevalue.backends.embedded import export_embedded_checkpoint
from statevalue_client import ValueClient
from statevalue_client.weights import named_tensor_list

TOKEN = "bench-weights"
# Parameter counts of common policy sizes (Qwen2.5 1.5B / 7B / 14B), sent as bf16.
SHAPES = {"1.5B": 1.54e9, "7B": 7.62e9, "14B": 14.77e9}


def swap_seconds(servers: Sequence[ServerProcess]) -> list[tuple[float, float]]:
    """Per replica: the sum and count of its weight swaps so far."""
    found = []
    for server in servers:
        page = httpx.get(f"http://127.0.0.1:{server.http_port}/metrics", timeout=30).text
        values = {
            line.split()[0]: float(line.split()[1])
            for line in page.splitlines()
            if line.startswith("statevalue_weight_swap_seconds_")
        }
        found.append(
            (
                values["statevalue_weight_swap_seconds_sum"],
                values["statevalue_weight_swap_seconds_count"],
            )
        )
    return found


def move(model: torch.nn.Module, seed: int) -> None:
    """A small change of every weight, as an optimizer step makes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 1e-4)


def timed_updates(
    model: torch.nn.Module,
    servers: Sequence[ServerProcess],
    update: Callable[[], list[float]],
    repeats: int,
) -> tuple[list[list[float]], float]:
    """``repeats`` updates: the phase times of each, and the longest mean swap per replica."""
    before = swap_seconds(servers)
    phases = []
    for repeat in range(repeats):
        move(model, repeat)
        phases.append(update())
    after = swap_seconds(servers)
    swap = max((a[0] - b[0]) / (a[1] - b[1]) for a, b in zip(after, before, strict=True))
    return phases, swap


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="updates per row")
    parser.add_argument("--bucket-mb", type=int, default=128, help="largest broadcast")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the trainer and of each replica (default: torch's own)",
    )
    parser.add_argument("--backend", choices=("torch", "vllm"), default="torch")
    parser.add_argument(
        "--replicas", default="1,2", help="comma-separated replica counts, one pass each"
    )
    args = parser.parse_args(argv)
    counts = [int(count) for count in args.replicas.split(",")]
    if args.threads is not None:
        # On a shared machine, parallel copies of several threads mostly wait for each
        # other; the replicas (subprocesses) read the same setting.
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    from transformers import AutoModelForCausalLM

    print(
        f"# statevalue weights, {datetime.date.today()}, {machine(torch.device('cpu'))}, device cpu"
    )
    print(f"# command: python -m bench.weights {shlex.join(argv or sys.argv[1:])}")
    with tempfile.TemporaryDirectory() as scratch:
        start = export_embedded_checkpoint(Path(scratch) / "start")
        saved = Path(scratch) / "saved"
        model = AutoModelForCausalLM.from_pretrained(start)
        nbytes = sum(t.nbytes for _, t in named_tensor_list(model.state_dict()))
        print(
            f"# model SmolLM2-135M-Instruct float32, {nbytes / 1e6:.0f} MB per update, "
            f"backend {args.backend}"
        )
        servers = [
            ServerProcess(
                str(start),
                "cpu",
                "float32",
                8192,
                "--admin-token",
                TOKEN,
                "--backend",
                args.backend,
            )
            for _ in range(max(counts))
        ]
        header = (
            f"{'update':<13} {'replicas':>8} {'MB':>6} {'wall s':>7} {'GB/s':>6} "
            f"{'save s':>7} {'reload s':>8} {'swap ms':>8}"
        )
        print(header)
        print("-" * len(header))
        rates: dict[tuple[str, int], float] = {}
        try:
            for replicas in counts:
                target = "ipv4:" + ",".join(f"127.0.0.1:{s.grpc_port}" for s in servers[:replicas])
                with ValueClient(target, timeout=600, retries=0) as client:

                    def by_disk() -> list[float]:
                        started = time.perf_counter()
                        model.save_pretrained(saved)
                        written = time.perf_counter()
                        client.reload_weights(str(saved), admin_token=TOKEN)
                        return [written - started, time.perf_counter() - written]

                    def by_gloo() -> list[float]:
                        started = time.perf_counter()
                        client.update_weights(
                            model.state_dict(),
                            admin_token=TOKEN,
                            transport="distributed",
                            bucket_bytes=args.bucket_mb << 20,
                        )
                        return [time.perf_counter() - started]

                    def by_shared_memory() -> list[float]:
                        started = time.perf_counter()
                        client.update_weights(
                            model.state_dict(), admin_token=TOKEN, transport="shared_memory"
                        )
                        return [time.perf_counter() - started]

                    rows = [
                        ("disk", by_disk, args.repeats),
                        ("gloo, first", by_gloo, 1),
                        ("gloo", by_gloo, args.repeats),
                        ("shared memory", by_shared_memory, args.repeats),
                    ]
                    for name, update, repeats in rows:
                        phases, swap = timed_updates(model, servers[:replicas], update, repeats)
                        wall = statistics.median(sum(p) for p in phases)
                        rates[name, replicas] = nbytes / wall
                        save, reload = (
                            (f"{statistics.median(p[i] for p in phases):.2f}" for i in (0, 1))
                            if name == "disk"
                            else ("-", "-")
                        )
                        print(
                            f"{name:<13} {replicas:>8} {nbytes / 1e6:>6.0f} {wall:>7.2f} "
                            f"{nbytes / wall / 1e9:>6.2f} {save:>7} {reload:>8} "
                            f"{swap * 1e3:>8.0f}"
                        )
        finally:
            for server in servers:
                server.close()
    print()
    most = max(counts)
    print(f"# extrapolated: bf16 bytes of each shape at the GB/s measured above on {most} replicas")
    print("# (the same loopback, cores and page cache; a network or storage of another speed")
    print("# scales the times by the ratio of its throughput to these)")
    header = f"{'shape':<6} {'GB':>6} {'disk s':>8} {'gloo s':>8} {'shm s':>8}"
    print(header)
    print("-" * len(header))
    for shape, parameters in SHAPES.items():
        size = 2 * parameters
        print(
            f"{shape:<6} {size / 1e9:>6.1f} {size / rates['disk', most]:>8.1f} "
            f"{size / rates['gloo', most]:>8.1f} {size / rates['shared memory', most]:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
