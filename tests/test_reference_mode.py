"""Reference mode: each rule of the authors' reference code, pinned on hand-checked cases,
and the whole estimators against the reference functions' output on real rollouts.

``tests/data/reference_golden.json`` holds the advantages the reference functions gave on
three groups of the SVEB dev split (embedded model, 16 rollouts each), evaluated exactly:
distances in float64, computed pair by pair, and ties at the k-th neighbour broken by
candidate order (the reference's float32 top-k breaks such ties by rounding noise, see
docs/design.md). tests/data/generate_reference_golden.py wrote it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import AdvantageConfig, EstimatorConfig, HistaConfig, NumcaConfig
from statevalue.engine import Engine
from statevalue.estimators import (
    NumcaTable,
    ema_smooth,
    hista_nodes,
    hista_representation,
    hista_values,
    neighbour_counts,
    node_prefix_lengths,
    numca_path,
    numca_values,
    segment_gae,
)
from statevalue.numca_store import TableUpdate, encode_state
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput

GOLDEN = Path(__file__).parent / "data" / "reference_golden.json"
E: frozenset[str] = frozenset()


def states(*rows: float) -> torch.Tensor:
    return torch.tensor([[r] for r in rows], dtype=torch.float32)


# -- Hista rules ------------------------------------------------------------------------


def test_ema_starts_from_the_first_vector() -> None:
    # e_0 = x_0 = 2 -> 2 / (1 - 0.5) = 4; e_1 = 0.5·2 + 0.5·4 = 3 -> 3 / 0.75 = 4.
    got = ema_smooth(states(2.0, 4.0), 0.5, "first")
    np.testing.assert_allclose(got[:, 0].numpy(), [4.0, 4.0], rtol=1e-6)
    # The textbook start: e_(-1) = 0 -> 2, then (0.5 + 2) / 0.75.
    np.testing.assert_allclose(ema_smooth(states(2.0, 4.0), 0.5, "zero")[:, 0], [2, 2.5 / 0.75])


def test_ema_first_matches_the_recursion() -> None:
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2))
    e = x[0].double()
    expected = [e / (1 - 0.7)]
    for t in range(1, len(x)):
        e = 0.7 * e + 0.3 * x[t].double()
        expected.append(e / (1 - 0.7 ** (t + 1)))
    got = ema_smooth(x, 0.7, "first")
    np.testing.assert_allclose(got.numpy(), torch.stack(expected).numpy(), atol=1e-5)


def test_inclusive_downsampling_keeps_0_w_2w_and_the_nodes_own_token() -> None:
    config = HistaConfig.reference(ema_alpha=0.0, stride=3)
    reps, counts = hista_representation([states(*range(8))], config)
    assert reps[0, : counts[0], 0].tolist() == [0.0, 3.0, 6.0]
    # A node at absolute position 6 holds the vectors at 0, 3 and 6 (its own token);
    # with "causal" it holds those strictly before it, at 2 and 5.
    assert node_prefix_lengths(4, np.array([2, 1]), 3, config).tolist() == [3, 2]
    causal = config.model_copy(update={"downsample": "causal"})
    reps, counts = hista_representation([states(*range(8))], causal)
    assert reps[0, : counts[0], 0].tolist() == [2.0, 5.0]
    assert node_prefix_lengths(4, np.array([2, 1]), 2, causal).tolist() == [2, 1]


def test_node_grid_anchored_at_the_first_prompt_token_ends_on_the_last_token() -> None:
    config = HistaConfig.reference(node_spacing=5)
    # Prompt 7, response 20: multiples of 5 strictly between 7 and the last token (26).
    nodes = hista_nodes(7, 20, config)
    assert nodes.interior.tolist() == [3, 8, 13, 18]
    assert nodes.candidates.tolist() == [0, 3, 8, 13, 18, 19]
    response = hista_nodes(7, 20, config.model_copy(update={"node_anchor": "response_start"}))
    assert response.interior.tolist() == [5, 10, 15]
    after = hista_nodes(7, 20, config.model_copy(update={"end_node": "after_response"}))
    assert after.interior.tolist() == [3, 8, 13, 18] and after.candidates[-1] == 20
    # One token: a single node, as the reference keeps only the response start.
    assert hista_nodes(7, 1, config).candidates.tolist() == [0]


def test_k_schedule_steps_by_the_floor_of_the_range_over_n() -> None:
    assert neighbour_counts(5, 66, 6, "floor_step").tolist() == [66, 54, 42, 30, 18]
    assert neighbour_counts(7, 66, 6, "floor_step").tolist() == [66, 58, 50, 42, 34, 26, 18]
    # More than k_max - k_min interior nodes: the step is 0, k_max everywhere.
    assert set(neighbour_counts(61, 66, 6, "floor_step").tolist()) == {66}


# Two rollouts, prompt of 1 token, no smoothing, every vector kept (stride 1).
# Rollout 0 (R=1): 0 | 4, 4, 9. Rollout 1 (R=0): 0 | 3, 3, 3.
TWO = [states(0.0, 4.0, 4.0, 9.0), states(0.0, 3.0, 3.0, 3.0)]
RAW = {"ema_alpha": 0.0, "stride": 1, "node_spacing": 1, "node_anchor": "response_start"}


def two_values(**config: object) -> list[np.ndarray]:
    estimate = hista_values(
        TWO,
        1,
        [3, 3],
        np.array([1.0, 0.0]),
        np.array([True, True]),
        HistaConfig.reference(**RAW, **config),
    )
    return estimate.values


def test_last_token_is_valued_at_the_reward() -> None:
    # Interior nodes at response tokens 1 (the last token, 2, is the end node).
    values = two_values(d_min=0.1, k_max=66, k_min=66)
    assert values[0][-1] == 1.0 and values[1][-1] == 0.0
    advantages = segment_gae(values[0], np.array([0, 1, 2]), 1.0, 1.0)
    assert advantages[-1] == 0.0
    np.testing.assert_allclose(advantages[:2], 1.0 - values[0][:2], rtol=1e-6)


def test_own_nodes_admitted_by_prefix_length() -> None:
    # Stride 2 keeps absolute positions 0, 2, 4: rollout 0 is represented by [0, 4, 9],
    # rollout 1 by [0, 3, 3]. Rollout 0's node at response token 1 (absolute 2) holds
    # [0, 4]; so does its node at token 2 (absolute 3), which lies past it.
    hidden = [states(0.0, 4.0, 4.0, 9.0, 9.0), states(0.0, 3.0, 3.0, 3.0, 3.0)]
    base = {"ema_alpha": 0.0, "stride": 2, "node_spacing": 1, "node_anchor": "response_start"}
    by_length = HistaConfig.reference(**base, d_min=0.1, k_max=2, k_min=2)
    by_boundary = by_length.model_copy(update={"own_nodes": "boundary"})
    rewards, rewarded = np.array([1.0, 0.0]), np.array([True, True])
    nodes = hista_nodes(1, 4, by_length)
    assert nodes.interior.tolist() == [1, 2] and nodes.candidates.tolist() == [0, 1, 2, 3]
    assert node_prefix_lengths(1, nodes.candidates, 3, by_length).tolist() == [1, 2, 2, 3]
    # By prefix length the two nearest are the node itself and its own next node (both at
    # distance 0, clamped to 0.1, R=1). By boundary the second is rollout 1's node at
    # token 1, [0, 3] at distance 0.5 (R=0): (10·1 + 2·0) / 12.
    a = hista_values(hidden, 1, [4, 4], rewards, rewarded, by_length).values[0]
    b = hista_values(hidden, 1, [4, 4], rewards, rewarded, by_boundary).values[0]
    assert a[1] == pytest.approx(1.0)
    assert b[1] == pytest.approx(10 / 12)


def test_plain_top_k_breaks_ties_by_candidate_order() -> None:
    # d_min = 100 clamps every distance: rollout 1's node at token 1 has five tied
    # candidates, rollout 0's three nodes (R=1) and its own start and itself (R=0; its end
    # node holds a longer prefix). k = 2 takes the first two in candidate order, both of
    # rollout 0; "with_ties" takes all five.
    top_k = two_values(d_min=100.0, k_max=2, k_min=2)
    with_ties = two_values(d_min=100.0, k_max=2, k_min=2, neighbours="with_ties")
    np.testing.assert_allclose(top_k[1][1], 1.0)
    np.testing.assert_allclose(with_ties[1][1], 0.6, rtol=1e-6)


# -- Numca rules ------------------------------------------------------------------------


def tokenised(tokens: list[str]) -> tuple[str, np.ndarray]:
    return "".join(tokens), np.cumsum([len(t) for t in tokens])


def test_table_counts_the_unmerged_chain() -> None:
    # "15" at token 1 and "7" at token 5 merge into one boundary (merge 50), yet the
    # rollout counts in {15} and in {15, 7}; "9" is the answer (dropped).
    text, ends = tokenised(["x", " 15", " a", " b", " c", " 7", " d", " 9"])
    path = numca_path(text, ends, NumcaConfig.reference())
    assert path.boundaries.tolist() == [0, 6]
    assert path.states == (E, frozenset({"15", "7"}))
    assert path.chain == (E, frozenset({"15"}), frozenset({"15", "7"}))
    table = NumcaTable()
    numca_values([path], [8], np.array([1.0]), np.array([True]), table, NumcaConfig.reference())
    assert table.count(frozenset({"15"})) == 1 and len(table) == 3


def test_number_in_the_last_token_still_counts_and_leads_to_a_final_state() -> None:
    config = NumcaConfig.reference(merge_distance=0, drop_last_number=False)
    text, ends = tokenised(["x", " 4", " y", " 8"])
    path = numca_path(text, ends, config)
    assert path.boundaries.tolist() == [0, 2] and path.final_state == frozenset({"4", "8"})
    other_text, other_ends = tokenised(["x", " 4", " z", " w"])
    other = numca_path(other_text, other_ends, config)
    estimate = numca_values(
        [path, other], [4, 4], np.array([1.0, 0.0]), np.array([True, True]), NumcaTable(), config
    )
    assert estimate.final_values == [1.0, None]
    # V(∅) = V({4}) = 0.5, V({4, 8}) = 1. λ = 0.5: the last segment ends in the final
    # state, δ = 1 - 0.5, then R - V_final = 0; the first segment: 0 + 0.5 · 0.5.
    assert estimate.values[0].tolist() == [0.5, 0.5, 0.5, 0.5]
    got = segment_gae(estimate.values[0], path.boundaries, 1.0, 0.5, None, 1.0)
    np.testing.assert_allclose(got, [0.25, 0.25, 0.5, 0.5])
    # Without the final state the last segment would be R - V = 0.5 at any λ.
    np.testing.assert_allclose(
        segment_gae(estimate.values[0], path.boundaries, 1.0, 0.5), [0.25, 0.25, 0.5, 0.5]
    )


def test_unseen_state_reads_zero() -> None:
    config = NumcaConfig.reference(merge_distance=0)
    rewarded_text, rewarded_ends = tokenised(["a", " 1", " b", " 2"])
    query_text, query_ends = tokenised(["a", " 5", " b", " 2"])
    paths = [
        numca_path(rewarded_text, rewarded_ends, config),
        numca_path(query_text, query_ends, config),
    ]
    args = ([4, 4], np.array([0.5, 0.0]), np.array([True, False]), NumcaTable())
    zero = numca_values(paths, *args, config)
    np.testing.assert_allclose(zero.values[1], [0.5, 0.5, 0.0, 0.0])
    previous = numca_values(
        paths,
        [4, 4],
        *args[1:3],
        NumcaTable(),
        config.model_copy(update={"unseen_state": "previous"}),
    )
    np.testing.assert_allclose(previous.values[1], [0.5, 0.5, 0.5, 0.5])


def test_groups_sharing_a_prompt_id_are_all_added_before_any_is_read(engine: Engine) -> None:
    text_a, text_b = "We get 3 then 4 so 7", "We get 3 then 5 so 8"
    ids = engine.token_text.encode_text
    prompt = ids("Q")

    def group(name: str, responses: list[tuple[str, float]]) -> GroupInput:
        return GroupInput(
            group_id=name,
            prompt_id="shared",
            prompt_ids=prompt,
            rollouts=[RolloutInput(response_ids=ids(t), reward=r) for t, r in responses],
        )

    config = EstimatorConfig(numca=NumcaConfig.reference(merge_distance=0))
    request = EstimateRequest(
        groups=[group("a", [(text_a, 1.0)]), group("b", [(text_b, 0.0)])],
        methods=("numca",),
        config=config,
    )
    both = engine.estimate(request)
    # Group a's first value is the empty set's over both groups' rollouts: 0.5.
    first = both.groups[0].rollouts[0].values["numca"]
    assert first[0] == pytest.approx(0.5)
    key = engine._table_key("shared", config.numca)
    [stats] = engine.numca_store.add_and_read([TableUpdate(key, (), (encode_state(E),))])
    assert stats[encode_state(E)] == (2, 1.0)


# -- the reference functions' output on real rollouts --------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


def test_golden_file_names_its_reference_patches_and_generator(golden: dict) -> None:
    from tests.data import generate_reference_golden as generator

    header = golden["header"]
    assert header["generator"] == "tests/data/generate_reference_golden.py"
    assert (Path(__file__).parents[1] / header["generator"]).is_file()
    # Written by the generator as it is now: a change to its logic bumps the version and
    # must come with the file it writes.
    assert header["generator_version"] == generator.GENERATOR_VERSION
    assert header["patches"] == generator.patch_descriptions()
    assert header["reference"]["commit"] == generator.REFERENCE_COMMIT
    assert set(header["reference"]["files"]) == {generator.HISTA_UTILS, generator.NUMCA_DICT}
    assert "float64 distances" in header["patches"]
    assert any("pair by pair" in patch for patch in header["patches"])
    assert any("candidate order" in patch for patch in header["patches"])
    ids = [json.loads(line)["id"] for line in generator.SVEB_DEV.read_text().splitlines()]
    assert [g["id"] for g in golden["groups"]] == ids[: generator.GROUPS]


@pytest.mark.slow
def test_reference_mode_equals_the_reference_code_on_real_rollouts(
    golden: dict, backend: TorchBackend, engine: Engine
) -> None:
    for record in golden["groups"]:
        group = GroupInput(
            group_id=record["id"],
            prompt_ids=np.asarray(record["prompt_ids"]),
            rollouts=[
                RolloutInput(response_ids=np.asarray(ids), reward=reward)
                for ids, reward in zip(record["responses"], record["rewards"], strict=True)
            ],
        )
        hidden = None  # one forward pass per group: the settings below change no input
        for expected in record["expected"]:
            method = expected["method"]
            advantage = AdvantageConfig(scale="none", lam=expected["lam"])
            if method == "hista":
                hista = HistaConfig.reference(node_spacing=expected["node_spacing"])
                config = EstimatorConfig(hista=hista, advantage=advantage)
                tolerance = 1e-4
            else:
                config = EstimatorConfig(numca=NumcaConfig.reference(), advantage=advantage)
                tolerance = 1e-6
            prepared = engine.prepare(
                EstimateRequest(groups=[group], methods=(method,), config=config)
            )
            if prepared.needs_hidden_states and hidden is None:
                hidden = backend.hidden_states(prepared.sequences(), prepared.prefix_lengths())
            result = engine.compute(prepared, hidden if prepared.needs_hidden_states else None)
            for rollout, want in zip(
                result.groups[0].rollouts, expected["advantages"], strict=True
            ):
                np.testing.assert_allclose(
                    rollout.advantages[method], want, atol=tolerance, err_msg=str(expected)[:80]
                )
