"""Hista values of two computations (forward paths, backends) compared at the served defaults.

At the default node spacing (a few tokens on short answers) some nodes have a candidate
within float32 rounding of their k-th nearest distance, and the two computations may then
disagree on whether it is a neighbour: a real tie, not an error. So the comparison runs on
``explain`` output: a node whose neighbour sets differ must differ only by candidates tied
(within ``distance_tol``) with the k-th distance; every other node's value must agree.
"""

from __future__ import annotations

import numpy as np

from statevalue.estimators.hista import HistaNode
from statevalue.schema import EstimateResult


def _near(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _check_tie(got: HistaNode, expected: HistaNode, distance_tol: float, where: str) -> None:
    """The neighbour sets of one node differ: only by candidates at the k-th distance."""
    got_at = {(n.rollout, n.token): n.distance for n in got.neighbours}
    expected_at = {(n.rollout, n.token): n.distance for n in expected.neighbours}
    got_kth, expected_kth = max(got_at.values()), max(expected_at.values())
    assert _near(got_kth, expected_kth, distance_tol), (where, got_kth, expected_kth)
    for key in got_at.keys() ^ expected_at.keys():
        distance = got_at.get(key, expected_at.get(key))
        assert distance is not None and _near(distance, got_kth, distance_tol), (
            f"{where}: neighbour {key} at {distance} is no tie with the k-th at {got_kth}"
        )


def assert_hista_agrees(
    got: EstimateResult,
    expected: EstimateResult,
    *,
    value_atol: float,
    distance_tol: float,
    max_tie_share: float = 0.25,
) -> None:
    """``got`` and ``expected`` (both computed with ``explain``) give the same Hista values
    up to ties: see the module's docstring. ``distance_tol`` is relative (absolute below
    1); at most ``max_tie_share`` of the interior nodes may differ by a tie."""
    nodes = ties = 0
    for group, reference in zip(got.groups, expected.groups, strict=True):
        for j, (rollout, wanted) in enumerate(zip(group.rollouts, reference.rollouts, strict=True)):
            assert rollout.explanation is not None and wanted.explanation is not None
            ours, theirs = rollout.explanation.hista_nodes, wanted.explanation.hista_nodes
            assert ours is not None and theirs is not None
            assert [n.token for n in ours] == [n.token for n in theirs]
            np.testing.assert_array_equal(rollout.boundaries["hista"], wanted.boundaries["hista"])
            values, reference_values = rollout.values["hista"], wanted.values["hista"]
            tied = np.zeros(len(values), dtype=bool)
            starts = list(rollout.boundaries["hista"]) + [len(values)]
            for node, other in zip(ours, theirs, strict=True):
                nodes += 1
                where = f"{group.group_id}[{j}] node at token {node.token}"
                ours_at = {(n.rollout, n.token): n.distance for n in node.neighbours}
                theirs_at = {(n.rollout, n.token): n.distance for n in other.neighbours}
                if ours_at.keys() == theirs_at.keys():
                    for key, distance in ours_at.items():
                        assert _near(distance, theirs_at[key], distance_tol), (where, key)
                    continue
                _check_tie(node, other, distance_tol, where)
                ties += 1
                start = starts.index(node.token)
                tied[node.token : starts[start + 1]] = True
            np.testing.assert_allclose(
                values[~tied], reference_values[~tied], atol=value_atol, err_msg=f"rollout {j}"
            )
            if not tied.any():
                np.testing.assert_allclose(
                    rollout.advantages["hista"], wanted.advantages["hista"], atol=10 * value_atol
                )
    assert nodes > 0, "no interior Hista node: the comparison proves nothing"
    assert ties <= max_tie_share * nodes, f"{ties} of {nodes} nodes differ by a tie"
