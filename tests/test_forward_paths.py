"""The packed and prompt-once forward paths against the padded one, on the embedded model."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from statevalue.backends.layout import group_shared_prefixes, pack_rows, row_attention_mask
from statevalue.backends.torch_backend import TorchBackend, check_forward_path
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from tests.parity import assert_hista_agrees

# Float32 sums in another order (other batch shapes, other kernels): the bound the padded
# path itself meets between a batch and one sequence alone (tests/test_backend.py).
ATOL, RTOL = 2e-4, 1e-4
# Hista's prefix distances between the paths: relative (absolute below 1).
DISTANCE_TOL = 1e-4


@pytest.fixture
def paths(backend: TorchBackend) -> Iterator[TorchBackend]:
    """The shared backend, its forward path restored after the test."""
    before = backend.forward_path
    yield backend
    backend.forward_path = before


def two_groups(group: GroupInput) -> tuple[list[np.ndarray], list[int]]:
    """Four sampled rollouts (cut to 40 tokens, lengths still mixed), a second group of
    three on another prompt, and a loner without a prompt."""
    prompt = np.asarray(group.prompt_ids)
    rollouts = group.rollouts[:4]
    sequences = [np.concatenate([prompt, r.response_ids[:40]]) for r in rollouts]
    other = prompt[::-1].copy()
    sequences += [np.concatenate([other, r.response_ids[:7]]) for r in group.rollouts[:3]]
    sequences.append(np.asarray(group.rollouts[0].response_ids[:20]))
    hints = [len(prompt)] * (len(rollouts) + 3) + [0]
    return sequences, hints


def test_group_shared_prefixes_checks_the_ids() -> None:
    a = np.array([1, 2, 3, 4, 5])
    b = np.array([1, 2, 3, 9])
    c = np.array([1, 2, 7, 8])  # hinted like the others but its prompt differs
    d = np.array([1, 2, 3])  # the hint would leave it no token of its own
    groups = group_shared_prefixes([a, b, c, d], [3, 3, 3, 3])
    assert [(g.prefix_length, g.members) for g in groups] == [(3, (0, 1)), (0, (2, 3))]
    assert [(g.prefix_length, g.members) for g in group_shared_prefixes([a, b], None)] == [
        (0, (0, 1))
    ]
    with pytest.raises(ValueError, match="prefix lengths"):
        group_shared_prefixes([a, b], [3])


def test_pack_rows_places_every_token_once_under_the_budget() -> None:
    lengths = [10, 14, 12, 5, 30]
    sequences = [np.arange(n) for n in lengths]
    groups = group_shared_prefixes(sequences, [4, 4, 4, 0, 0])
    rows = pack_rows(lengths, groups, max_row_tokens=24)
    own = sorted((s.source, s.offset, s.length) for row in rows for s in row if not s.is_prefix)
    assert own == [(0, 4, 6), (1, 4, 10), (2, 4, 8), (3, 0, 5), (4, 0, 30)]
    for row in rows:
        starts = [s.start for s in row]
        assert starts == sorted(starts) and starts[0] == 0
        used = sum(s.length for s in row)
        assert used <= 24 or len(row) == 1  # the 30-token sequence runs alone
        for s in row:
            if s.parent is not None:
                assert row[s.parent].is_prefix and row[s.parent].length == 4
    # The group of three does not fit one row: its prompt is repeated in the next.
    assert sum(s.is_prefix for row in rows for s in row) == 2


def test_row_mask_is_causal_within_a_sequence_and_its_prompt() -> None:
    lengths = [5, 4]
    sequences = [np.array([1, 2, 3, 4, 5]), np.array([1, 2, 3, 9])]
    (row,) = pack_rows(lengths, group_shared_prefixes(sequences, [3, 3]), 100)
    visible = row_attention_mask(row, torch.float32, torch.device("cpu"))[0, 0] == 0
    # Row: prompt 0-2, own tokens of sequence 0 at 3-4, of sequence 1 at 5.
    assert visible[4].tolist() == [True] * 5 + [False]
    assert visible[5].tolist() == [True] * 3 + [False, False, True]
    assert visible[1].tolist() == [True, True] + [False] * 4


@pytest.mark.slow
@pytest.mark.parametrize("path", ["packed", "prompt_once"])
@pytest.mark.parametrize("budget", [8192, 96])
def test_hidden_states_equal_the_padded_path(
    paths: TorchBackend,
    sampled_group: GroupInput,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    budget: int,
) -> None:
    """Real rollouts of mixed lengths; the small budget splits groups across steps."""
    sequences, hints = two_groups(sampled_group)
    monkeypatch.setattr(paths, "_max_batch_tokens", budget)
    paths.forward_path = "padded"
    expected = paths.hidden_states(sequences, hints)
    paths.forward_path = path
    got = paths.hidden_states(sequences, hints)
    assert len(got) == len(sequences)
    for states, reference, sequence in zip(got, expected, sequences, strict=True):
        assert states.shape == (len(sequence), 576)
        assert states.dtype == torch.float32
        torch.testing.assert_close(states, reference, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_hista_values_through_the_engine_equal_the_padded_path(
    paths: TorchBackend, engine: Engine, sampled_group: GroupInput
) -> None:
    second = GroupInput(
        group_id="reversed",
        prompt_ids=np.asarray(sampled_group.prompt_ids)[::-1].copy(),
        rollouts=[
            RolloutInput(response_ids=r.response_ids[:30], reward=float(i % 2))
            for i, r in enumerate(sampled_group.rollouts[:4])
        ],
    )
    # The served defaults (a node every few tokens here); neighbours tied within float32
    # rounding may differ between the paths, which assert_hista_agrees allows for.
    request = EstimateRequest(groups=[sampled_group, second], methods=("hista",), explain=True)
    results = {}
    for path in ("padded", "packed", "prompt_once"):
        paths.forward_path = path
        results[path] = engine.estimate(request)
    for path in ("packed", "prompt_once"):
        assert_hista_agrees(
            results[path], results["padded"], value_atol=1e-5, distance_tol=DISTANCE_TOL
        )


def test_forward_path_names_are_checked(backend: TorchBackend) -> None:
    assert backend.forward_path == "padded"
    assert check_forward_path("prompt_once") == "prompt_once"
    assert check_forward_path("auto") == "padded"
    with pytest.raises(ValueError, match="forward path"):
        check_forward_path("prompt-once")
