"""What sending Hista's representations costs and saves (docs/benchmarks.md).

``bytes``: the bytes a trainer sends per rollout and per step for model shapes it cannot
run here (arithmetic on the representation counts of ``statevalue_client.states``).

``time``: the service time of one step of Hista, by the engine in this process: the
forward-pass path (the server runs the model) against a server with no model
(``--backend none``) answering from representations the trainer sent; the trainer's cost
of making them from hidden states it already has is shown beside.

Examples::

    python -m bench.hista_states bytes
    nice -n 10 python -m bench.hista_states time --groups 4 --group-size 8 --response 256
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from statevalue_client.states import StatesFormat, representation_counts  # noqa: E402

# Model shapes (hidden size) the trainer side is sized for.
SHAPES = {"1.5B (hidden 1536)": 1536, "7B (hidden 3584)": 3584}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
# (projection dimension or None for the full hidden size, dtype) of each column.
COLUMNS = (
    (None, "float32"),
    (None, "bfloat16"),
    (256, "bfloat16"),
    (128, "bfloat16"),
    (64, "bfloat16"),
)


def rollout_bytes(
    hidden: int, dimension: int | None, dtype: str, prompt: int, response: int, group: int
) -> float:
    """Bytes per rollout: its own vectors and its share of the group's prompt part."""
    fmt = StatesFormat(hidden)
    shared, own = representation_counts(prompt, response, fmt.stride, fmt.downsample)
    return (own + shared / group) * (dimension or hidden) * ITEMSIZE[dtype]


def bytes_table(prompt: int, group: int, groups: int, responses: list[int]) -> str:
    def size(n: float) -> str:
        for unit, scale in (("MB", 1e6), ("kB", 1e3)):
            if n >= scale:
                return f"{n / scale:,.1f} {unit}"
        return f"{n:,.0f} B"

    head = [f"{'full' if d is None else d} {t}" for d, t in COLUMNS]
    lines = [
        f"Stride 5 (the default), prompt {prompt} tokens sent once per group of {group}, "
        f"{groups} groups per step ({groups * group} rollouts); token ids for comparison.\n",
        "| shape | response tokens | per | token ids | " + " | ".join(head) + " |",
        "|---|---:|---|---:|" + "---:|" * len(head),
    ]
    for name, hidden in SHAPES.items():
        for response in responses:
            ids = (response + prompt / group) * 4
            per_rollout = [rollout_bytes(hidden, d, t, prompt, response, group) for d, t in COLUMNS]
            full = per_rollout[0]
            cells = [f"{size(b)} ({full / b:.0f}×)" if b < full else size(b) for b in per_rollout]
            lines.append(
                f"| {name} | {response:,} | rollout | {size(ids)} | " + " | ".join(cells) + " |"
            )
            step = [size(b * group * groups) for b in per_rollout]
            lines.append(
                f"| {name} | {response:,} | step | {size(ids * group * groups)} | "
                + " | ".join(step)
                + " |"
            )
    return "\n".join(lines)


def time_table(args: argparse.Namespace) -> str:
    import torch

    from statevalue.backends.no_model import NoModelBackend
    from statevalue.backends.torch_backend import TorchBackend
    from statevalue.engine import Engine
    from statevalue.grpc_server import request_from_proto
    from statevalue_client import Group, Rollout
    from statevalue_client.client import build_request
    from statevalue_client.states import group_states

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = TorchBackend(args.model, device=args.device)
    rng = np.random.default_rng(0)
    vocab = backend.vocab_size
    groups = [
        Group(
            prompt_ids=rng.integers(0, vocab, args.prompt, dtype=np.int32),
            rollouts=[
                Rollout(rng.integers(0, vocab, args.response, dtype=np.int32), float(j % 2))
                for j in range(args.group_size)
            ],
            group_id=f"g{g}",
        )
        for g in range(args.groups)
    ]
    params = {"hista": {}}
    with_model = Engine(backend)
    no_model = Engine(NoModelBackend(args.model))
    rows: dict[str, list[float]] = {
        "forward-pass path (server runs the model)": [],
        "trainer: states from its hidden states": [],
        "backend none: Hista from sent states": [],
    }
    sizes: dict[str, int] = {}
    for _ in range(args.repeats):
        started = time.perf_counter()
        plain = build_request(groups, ("hista",), params)
        with_model.estimate(request_from_proto(plain))
        rows["forward-pass path (server runs the model)"].append(time.perf_counter() - started)
        sizes["forward-pass path (server runs the model)"] = plain.ByteSize()
        hidden = backend.hidden_states(
            [np.concatenate([g.prompt_ids, r.response_ids]) for g in groups for r in g.rollouts]
        )
        fmt = StatesFormat.for_hista(
            backend.hidden_size, dimension=args.dimension, dtype=args.dtype, seed=0
        )
        started = time.perf_counter()
        sent = []
        for g, group in enumerate(groups):
            own = hidden[g * args.group_size : (g + 1) * args.group_size]
            states = group_states(own, args.prompt, fmt)
            sent.append(dataclasses.replace(group, hista_states=states))
        request = build_request(sent, ("hista",), params)
        rows["trainer: states from its hidden states"].append(time.perf_counter() - started)
        sizes["trainer: states from its hidden states"] = request.ByteSize()
        started = time.perf_counter()
        no_model.estimate(request_from_proto(request))
        rows["backend none: Hista from sent states"].append(time.perf_counter() - started)
        sizes["backend none: Hista from sent states"] = request.ByteSize()
    tokens = args.groups * args.group_size * (args.prompt + args.response)
    lines = [
        f"One step: {args.groups} groups × {args.group_size} rollouts, prompt {args.prompt} + "
        f"response {args.response} tokens ({tokens:,} tokens), Hista at the defaults; "
        f"states {args.dimension or 'full'}-dim {args.dtype}; model {backend.identity.name} on "
        f"{backend.device}, {torch.get_num_threads()} threads; median of {args.repeats}.\n",
        "| path | seconds per step | request bytes |",
        "|---|---:|---:|",
    ]
    for label, seconds in rows.items():
        lines.append(f"| {label} | {statistics.median(seconds):.3f} | {sizes[label]:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sizes = commands.add_parser("bytes", help="bytes per rollout and per step")
    sizes.add_argument("--prompt", type=int, default=256)
    sizes.add_argument("--group-size", type=int, default=8)
    sizes.add_argument("--groups", type=int, default=64)
    sizes.add_argument("--responses", default="1024,4096")
    timing = commands.add_parser("time", help="service time per step, with and without a model")
    timing.add_argument("--model", default="embedded")
    timing.add_argument("--device", default="cpu")
    timing.add_argument("--threads", type=int, default=0)
    timing.add_argument("--groups", type=int, default=4)
    timing.add_argument("--group-size", type=int, default=8)
    timing.add_argument("--prompt", type=int, default=64)
    timing.add_argument("--response", type=int, default=256)
    timing.add_argument("--dimension", type=int, default=256)
    timing.add_argument("--dtype", default="bfloat16")
    timing.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "bytes":
        responses = [int(r) for r in args.responses.split(",")]
        print(bytes_table(args.prompt, args.group_size, args.groups, responses))
    else:
        print(time_table(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
