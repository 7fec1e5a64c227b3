"""Hidden states and Hista values on a device against CPU float32, for every forward path.

    python -m bench.device_parity --device cuda        # float32 and bfloat16 on the GPU
    python -m bench.device_parity --device cpu --dtypes float32 --responses 4 --max-new 16

Rollouts are sampled from the embedded model on CPU (one prompt, mixed rewards by the
answer's last number), then the same sequences run on the device in each dtype and forward
path. Printed per row: the largest hidden-state difference (absolute, and relative to the
largest hidden-state value), and the largest Hista value difference. Exits 1 when a row is
outside the tolerance of its dtype.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

import numpy as np

from statevalue.backends.torch_backend import FORWARD_PATHS, TorchBackend
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput

QUESTION = "Tom has 5 apples and buys 3 more. How many apples does he have now?"
# Largest Hista value difference accepted per dtype (values are rewards in [0, 1]).
TOLERANCE = {"float32": 2e-3, "bfloat16": 5e-2, "float16": 2e-2}


def sampled_group(backend: TorchBackend, engine: Engine, n: int, max_new: int) -> GroupInput:
    prompt = engine.token_text.encode_chat([{"role": "user", "content": QUESTION}])
    responses = backend.generate(prompt, n, max_new_tokens=max_new, seed=0)
    rewards = []
    for response in responses:
        numbers = re.findall(r"\d+", engine.token_text.decode_with_offsets(response)[0])
        rewards.append(float(bool(numbers) and numbers[-1] == "8"))
    if len(set(rewards)) == 1:  # Hista needs some spread; keep the rollouts, alternate rewards
        rewards = [float(i % 2) for i in range(n)]
    return GroupInput(
        group_id="apples",
        prompt_ids=prompt,
        rollouts=[
            RolloutInput(response_ids=r, reward=w) for r, w in zip(responses, rewards, strict=True)
        ],
    )


def hista(engine: Engine, group: GroupInput) -> list[np.ndarray]:
    result = engine.estimate(EstimateRequest(groups=[group], methods=("hista",)))
    return [rollout.values["hista"] for rollout in result.groups[0].rollouts]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--responses", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=96, help="tokens per sampled response")
    parser.add_argument(
        "--model", default="embedded", help="'embedded' (default) or a model directory"
    )
    args = parser.parse_args(argv)

    reference = TorchBackend(args.model, device="cpu", dtype="float32", forward_path="padded")
    ref_engine = Engine(reference)
    group = sampled_group(reference, ref_engine, args.responses, args.max_new)
    prepared = ref_engine.prepare(EstimateRequest(groups=[group], methods=("hista",)))
    sequences, hints = prepared.sequences(), prepared.prefix_lengths()
    ref_states = reference.hidden_states(sequences)
    ref_values = hista(ref_engine, group)
    scale = max(float(s.abs().max()) for s in ref_states)
    lengths = [len(r.response_ids) for r in group.rollouts]
    print(
        f"# {len(sequences)} rollouts of {min(lengths)}..{max(lengths)} tokens after a "
        f"{len(group.prompt_ids)}-token prompt; largest |h| on CPU float32 {scale:.1f}"
    )
    print(f"{'device':<8} {'dtype':<9} {'path':<12} {'max |dh|':>9} {'rel':>9} {'max |dV|':>9}")
    failed = False
    for dtype in args.dtypes.split(","):
        backend = TorchBackend(args.model, device=args.device, dtype=dtype)
        engine = Engine(backend)
        for path in FORWARD_PATHS:
            backend.forward_path = path
            states = backend.hidden_states(sequences, hints)
            diff = max(
                float((s.float().cpu() - r).abs().max())
                for s, r in zip(states, ref_states, strict=True)
            )
            values = hista(engine, group)
            dv = max(float(np.abs(v - r).max()) for v, r in zip(values, ref_values, strict=True))
            ok = dv <= TOLERANCE[dtype]
            failed |= not ok
            print(f"{args.device:<8} {dtype:<9} {path:<12} {diff:>9.2e} {diff / scale:>9.2e} "
                  f"{dv:>9.2e}{'' if ok else '  OUT OF TOLERANCE'}")  # fmt: skip
        del engine, backend
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
