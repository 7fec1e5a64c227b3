"""Writes tests/data/reference_golden.json: the authors' reference functions' advantages on
real rollouts, for tests/test_reference_mode.py.

    git -C HISTA archive COMMIT src/rl/utils | tar -x -C /tmp/hista-reference
    python -m tests.data.generate_reference_golden --reference /tmp/hista-reference \\
        --reference-commit COMMIT --output golden.json

HISTA is a clone of the authors' reference code (VOXXXX1874/Hista on GitHub); the golden
file was made from commit 6f4ae4e. Only two of its files are read, from a directory outside
this repository: ``src/rl/utils/hista_utils.py`` and ``src/rl/utils/numca_dict.py``. The
steps its trainers (``src/rl/trainer/hista_trainer.py``, ``numca_trainer.py``) take between
those functions, which need a distributed trl trainer to run, are written out below for one
group at a time.

The inputs are the first three groups of the SVEB dev split (bench/sveb/data/dev.jsonl, 16
rollouts of the embedded model each) and their last-layer hidden states from the embedded
model on CPU in float32 (the torch backend's padded path). Per group: Hista at node spacing
10 and 50, and Numca, each at λ = 1 and 0.9, advantages unscaled.

The reference is run with the patches in PATCHES (each must apply exactly where listed, so
a different reference fails loudly instead of giving other numbers), with each rollout's
own length as its generation length (the trainers pass the batch's padded length), and
with Numca's token positions taken from the rollout's ids (the trainer re-tokenises the
decoded text); docs/design.md, "Reference mode and the defaults", lists both differences.

Status: tests/data/reference_golden.json is version 2's output, run against commit 6f4ae4e
with the embedded model. It replaces a file made before this script (version 0), which
version 1 (without the pair-by-pair patch) reproduced except for 7 of the 96 (rollout,
node spacing) pairs, by up to 0.08: in those, candidates tie exactly at the k-th distance
(start nodes, which share the prompt, among them), and cdist's matrix-product form for the
longer rollouts (more than 25 vectors) ranked them by rounding noise rather than by
candidate order. Version 2 gives the version-0 file's advantages to 1e-7 (Numca to 5e-9),
on every pair.
"""

from __future__ import annotations

import argparse
import json
import re
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from statevalue.backends.torch_backend import TorchBackend

GENERATOR_VERSION = 2
REFERENCE_COMMIT = "6f4ae4ecfe57ca8d6b5108406f8d289f9a7224fc"
GOLDEN = Path(__file__).with_name("reference_golden.json")
SVEB_DEV = Path(__file__).parents[2] / "bench" / "sveb" / "data" / "dev.jsonl"
GROUPS = 3
NODE_SPACINGS = (10, 50)
LAMBDAS = (1.0, 0.9)
# The reference trainer's defaults for the arguments its functions take from it.
MAX_K, MIN_K = 66, 6

HISTA_UTILS = "src/rl/utils/hista_utils.py"
NUMCA_DICT = "src/rl/utils/numca_dict.py"

# (what the patch does, file, text in the reference, its replacement, occurrences).
# torch.cdist takes the matrix-product form for blocks of more than 25 vectors, whose
# rounding (about 1e-7 on these prefixes, even in float64) made the distance to a prefix
# depend on how long the candidate's rollout is: nodes tied exactly (start nodes, which
# share the prompt) were then sorted by that noise instead of by candidate order. Pair by
# pair, equal prefixes give equal distances.
PATCHES: tuple[tuple[str, str, str, str, int], ...] = (
    ("CPU instead of CUDA", HISTA_UTILS, '.to("cuda")', '.to("cpu")', 2),
    ("float64 distances", HISTA_UTILS, ".float()", ".double()", 4),
    ("float64 distances", HISTA_UTILS, "torch.float32", "torch.float64", 3),
    (
        "distances computed pair by pair, not in the matrix-product form",
        HISTA_UTILS,
        "torch.cdist(online_block, offline_block, p=2)",
        "torch.cdist(online_block, offline_block, p=2, "
        'compute_mode="donot_use_mm_for_euclid_dist")',
        1,
    ),
    (
        "ties at the k-th neighbour (distances equal in float32) broken by candidate order",
        HISTA_UTILS,
        "torch.topk(distances_tensor, curr_k, largest=False, sorted=True)",
        "(lambda nearest: (distances_tensor[nearest], nearest))"
        "(torch.sort(distances_tensor.float(), stable=True).indices[:curr_k])",
        1,
    ),
)


def patch_descriptions() -> list[str]:
    """The patches as the golden file's header lists them: each once, in order."""
    return list(dict.fromkeys(description for description, *_ in PATCHES))


def load_reference(directory: Path, relative: str) -> types.ModuleType:
    """One reference file as a module, with its patches applied."""
    source = (directory / relative).read_text()
    for description, path, old, new, count in PATCHES:
        if path != relative:
            continue
        found = source.count(old)
        if found != count:
            raise SystemExit(f"{relative}: {description}: {old!r} found {found}x, not {count}x")
        source = source.replace(old, new)
    module = types.ModuleType(Path(relative).stem)
    exec(compile(source, str(directory / relative), "exec"), module.__dict__)
    return module


def hista_advantages(
    hista: types.ModuleType,
    hidden: list[torch.Tensor],
    prompt_len: int,
    rewards: list[float],
    spacing: int,
    lam: float,
) -> list[list[float]]:
    """``HistaTrainer._calculate_Hista_advantages`` for one group on one process."""
    lengths = [len(states) for states in hidden]
    batch = torch.zeros(len(hidden), max(lengths), hidden[0].shape[1])
    for i, states in enumerate(hidden):
        batch[i, : len(states)] = states
    mask = torch.zeros(len(hidden), max(lengths), dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    prompt_mask = torch.ones(len(hidden), prompt_len, dtype=torch.long)
    embeddings, response_indices, representation_indices = hista.steps_selection(
        hidden_states=batch,
        start_token_index=[prompt_len] * len(hidden),
        attention_mask=mask,
        prompt_mask=prompt_mask,
        min_interval=spacing,
        selection_method=hista.embedding_selection_uniform,
        average_method=hista.exponential_running_average,
    )
    reward_tensors = [torch.tensor(r) for r in rewards]
    sequence, nodes, representations = hista.to_embeddings_indices_sequence(
        {0: embeddings}, {0: representation_indices}, {0: reward_tensors}
    )
    mean = sum(reward_tensors) / len(reward_tensors)
    advantages = []
    for i, (own, indices, response) in enumerate(
        zip(embeddings, representation_indices, response_indices, strict=True)
    ):
        values = hista.calculate_weighted_distance_for_nodes(
            offline_embeddings=sequence[0],
            existing_nodes=nodes[0],
            online_embeddings=own,
            online_nodes=[(0, index + 1) for index in indices[1:-1]],
            online_representations=representations[0][i],
            max_k=MAX_K,
            min_k=MIN_K,
            t=1.0,
        )
        values = [mean, *values, rewards[i]]
        length = lengths[i] - prompt_len
        advantages.append(
            [float(a) for a in hista.calculate_GAE_advantages(values, response, lam, length)]
        )
    return advantages


def numca_advantages(
    numca: types.ModuleType, tokenizer: Any, responses: list[list[int]], rewards: list[float]
) -> dict[float, list[list[float]]]:
    """``NumcaTrainer._calculate_Numca_advantages`` for one group on one process, per λ."""
    parsed = []
    for response in responses:
        completion = tokenizer.decode(response)
        expressions, characters = numca.number_parse(completion)
        # The trainer maps characters to tokens by re-tokenising the text; here each
        # token's end comes from the ids themselves (docs/design.md lists the difference).
        ends = [len(tokenizer.decode(response[: t + 1])) for t in range(len(response))]
        positions = [
            next((t + 1 for t, end in enumerate(ends) if c < end), len(ends)) for c in characters
        ]
        parsed.append((expressions, positions))
    table = numca.Numca_dict()
    for (expressions, _), reward in zip(parsed, rewards, strict=True):
        table.update(expressions, reward)
    return {
        lam: [
            [
                float(a)
                for a in table.advantages(
                    expressions, positions, len(response), lam, final_reward=reward
                )
            ]
            for (expressions, positions), response, reward in zip(
                parsed, responses, rewards, strict=True
            )
        ]
        for lam in LAMBDAS
    }


def golden(reference: Path, commit: str, backend: TorchBackend) -> dict[str, Any]:
    hista = load_reference(reference, HISTA_UTILS)
    numca = load_reference(reference, NUMCA_DICT)
    records = [json.loads(line) for line in SVEB_DEV.read_text().splitlines()[:GROUPS]]
    groups = []
    for record in records:
        prompt, rewards = record["prompt_ids"], record["rewards"]
        responses = [response["ids"] for response in record["responses"]]
        hidden = backend.hidden_states(
            [torch.tensor(prompt + r).numpy() for r in responses], [len(prompt)] * len(responses)
        )
        hidden = [states.float().cpu() for states in hidden]
        by_spacing = {
            (spacing, lam): hista_advantages(hista, hidden, len(prompt), rewards, spacing, lam)
            for lam in LAMBDAS
            for spacing in NODE_SPACINGS
        }
        by_lambda = numca_advantages(numca, backend.tokenizer, responses, rewards)
        expected = []
        for lam in LAMBDAS:
            for spacing in NODE_SPACINGS:
                expected.append(
                    {
                        "method": "hista",
                        "lam": lam,
                        "node_spacing": spacing,
                        "advantages": by_spacing[spacing, lam],
                    }
                )
            expected.append({"method": "numca", "lam": lam, "advantages": by_lambda[lam]})
        groups.append(
            {
                "id": record["id"],
                "prompt_ids": prompt,
                "responses": responses,
                "rewards": rewards,
                "expected": expected,
            }
        )
    return {
        "header": {
            "generator": "tests/data/generate_reference_golden.py",
            "generator_version": GENERATOR_VERSION,
            "reference": {
                "repository": "VOXXXX1874/Hista",
                "commit": commit,
                "files": [HISTA_UTILS, NUMCA_DICT],
            },
            "patches": patch_descriptions(),
            "model": {"name": backend.identity.name, "version": backend.identity.version},
            "inputs": f"bench/sveb/data/dev.jsonl, first {GROUPS} groups",
        },
        "groups": groups,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reference", type=Path, required=True, help="a checkout of the reference code"
    )
    parser.add_argument(
        "--reference-commit",
        default=REFERENCE_COMMIT,
        help="the commit the checkout is of (40 hex; default: the golden file's)",
    )
    parser.add_argument("--model", default="embedded", help="'embedded' or a model directory")
    parser.add_argument(
        "--output", type=Path, required=True, help=f"where to write ({GOLDEN.name} is the test's)"
    )
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[0-9a-f]{40}", args.reference_commit):
        parser.error("--reference-commit: the full 40-hex commit id")
    backend = TorchBackend(args.model, device="cpu", dtype="float32", forward_path="padded")
    data = golden(args.reference, args.reference_commit, backend)
    args.output.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
