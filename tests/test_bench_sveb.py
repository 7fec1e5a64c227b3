"""Smoke run of the SVEB benchmark scripts: a tiny set, its calibration, the evaluation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.sveb import calibrate, defaults, evaluate, generate
from statevalue.backends.torch_backend import TorchBackend
from tests.servers import running_server

METHODS = (
    "group mean",
    "numca digits (ref)",
    "numca decimal (ref)",
    "hista (ref)",
    "numca calibrated",
    "numca calibrated + shrinkage",
    "hista calibrated",
    "hista calibrated, relative d_min",
    "hista calibrated + own_weight",
    "shrinkage ½R_i+½R̄",
    "learned critic (ridge)",
    "MC-1 floor",
    "MC-2 floor",
)


def test_generate_and_evaluate_tiny_set(
    tmp_path: Path, backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    # One torch thread: several times faster than two when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_tiny_set(tmp_path, backend, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_tiny_set(
    tmp_path: Path, backend: TorchBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--out-dir", str(tmp_path), "--dev", "1", "--test", "1", "--train", "1"]
    # K = 3: the 2-sample Monte Carlo floor needs at least one continuation left over.
    argv += ["-G", "4", "-K", "3", "--max-new-tokens", "24", "--no-progress"]
    assert generate.main(argv, backend=backend) == 0
    for split in ("dev", "test", "train"):
        assert (tmp_path / f"{split}.jsonl").exists()
    # Resuming a complete set does nothing.
    assert generate.main(argv, backend=backend) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 1

    settings = tmp_path / "calibrated.json"
    argv = ["--data-dir", str(tmp_path), "--write", str(settings)]
    assert calibrate.main(argv, backend=backend) == 0
    out = capsys.readouterr().out
    chosen = json.loads(settings.read_text())
    assert set(evaluate.CALIBRATED_KEYS) <= set(chosen)
    assert "### Distance histograms" in out and "nearest node, other rollout" in out

    argv = ["--data-dir", str(tmp_path), "--calibrated-file", str(settings), "--quiet"]
    assert defaults.main([*argv, "--split", "dev", "--grid"], backend=backend) == 0
    grid = capsys.readouterr().out
    assert "| hista relative_node_spacing=0.08 |" in grid
    assert defaults.main([*argv, "--split", "test"], backend=backend) == 0
    compared = capsys.readouterr().out
    assert {"hista defaults (adaptive)", "numca previous defaults (fixed 50)"} <= set(
        summary_maes(compared)
    )
    assert "Goals of the adaptive defaults" in compared

    argv = ["--in-process", "--data-dir", str(tmp_path), "--split", "test", "--by-family"]
    argv += ["--calibrated-file", str(settings), "--group-sizes", "4,2", "--quiet"]
    assert evaluate.main(argv, backend=backend) == 0
    out = capsys.readouterr().out
    tables = out.split("## SVEB accuracy")[1:]
    assert [t.split("\n")[0] for t in tables] == [" — split test, G = 4", " — split test, G = 2"]
    for table in tables:
        maes = summary_maes(table.split("MAE by family")[0])
        assert set(METHODS) <= set(maes), f"rows missing:\n{out}"
        assert all(math.isfinite(v) for v in maes.values())
        assert "MAE by family" in table
        # Each method's paired difference ± SE against the group mean and the trivial mix.
        assert "| − group mean ± SE | − ½R_i+½R̄ ± SE |" in table
        cell = r"(?:[+-][0-9.]+ ± [0-9.na]+|—)"
        assert re.search(
            rf"^\| hista \(ref\) \| [^|]+ \| [^|]+ \| {cell} \| {cell} \|", table, re.M
        )
    in_process = summary_maes(tables[0])

    # The same groups through the public gRPC client and a real server: the same numbers,
    # so every calibrated parameter crossed the wire.
    argv = ["--target", "", "--data-dir", str(tmp_path), "--split", "test", "--no-critic"]
    argv += ["--calibrated-file", str(settings), "--group-sizes", "4", "--quiet"]
    specs = evaluate.engine_specs(json.loads(settings.read_text()))
    (record,) = evaluate.load_records(tmp_path, "test")
    # Mixed rewards, so that every method's values depend on its parameters.
    record["rewards"] = [float(i % 2) for i in range(len(record["responses"]))]
    for response, reward in zip(record["responses"], record["rewards"], strict=True):
        response["reward"] = reward
    local = evaluate.InProcessSource(backend)
    expected = local.values(record, specs, evaluate.group_hidden(backend, record))
    with running_server(backend) as server:
        argv[1] = server.grpc_target
        assert evaluate.main(argv, backend=backend) == 0
        remote = evaluate.ClientSource(server.grpc_target).values(record, specs)
    over_grpc = summary_maes(capsys.readouterr().out)
    for method in METHODS:
        if method.startswith(("numca", "hista", "group mean")):
            assert over_grpc[method] == pytest.approx(in_process[method], abs=2e-3), method
    for spec in specs:
        for got, want in zip(remote[spec.label], expected[spec.label], strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=spec.label)


def test_paired_differences_are_clustered_by_prompt() -> None:
    errors, base = np.array([0.1, 0.3, 0.4]), np.array([0.2, 0.2, 0.2])
    # Differences −0.1, +0.1 (prompt a) and +0.2 (b), mean 0.2/3; prompt residuals
    # 0 − 2·mean and 0.2 − mean: SE = √(2·(0.4/3)²) / 3 = 0.0889.
    assert evaluate.paired_text(errors, base, ["a", "a", "b"]) == "+0.0667 ± 0.0889"
    assert evaluate.paired_text(errors, errors, ["a", "a", "b"]) == "—"
    assert evaluate.paired_text(errors, None, ["a", "a", "b"]) == "—"


def summary_maes(table: str) -> dict[str, float]:
    """Method -> MAE of the rows of a printed summary table."""
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9.]+) ± [0-9.na]+ \|", table, re.M)
    return {method: float(mae) for method, mae in rows}


def test_subgroups_keep_the_state_response_and_are_seeded() -> None:
    record = {
        "id": "dev-0001",
        "responses": [{"ids": [i], "reward": float(i % 2)} for i in range(6)],
        "rewards": [float(i % 2) for i in range(6)],
        "states": [{"response": 4, "t": 0, "target": 0.5}, {"response": 1, "t": 0, "target": 0.5}],
    }
    hidden = [torch.full((2, 3), float(i)) for i in range(6)]
    views = evaluate.group_views(record, hidden, 3)
    assert len(views) == 2
    for (group, group_hidden, states), original in zip(views, record["states"], strict=True):
        assert len(group["responses"]) == 3 and len(group_hidden) == 3
        (state,) = states
        chosen = group["responses"][state["response"]]
        assert chosen == record["responses"][original["response"]]
        # Each subgroup's hidden states are those of its own responses, in order.
        assert [int(h[0, 0]) for h in group_hidden] == [r["ids"][0] for r in group["responses"]]
        assert group["rewards"] == [r["reward"] for r in group["responses"]]
    again = evaluate.group_views(record, hidden, 3)
    assert [v[0]["responses"] for v in again] == [v[0]["responses"] for v in views]
    (whole,) = evaluate.group_views(record, hidden, 6)
    assert whole[0] is record and whole[2] == record["states"]


def test_a_resumed_plan_never_repeats_a_written_question() -> None:
    families = list(generate.DEFAULT_FAMILIES)
    counts = {"dev": 6, "test": 6, "train": 6}
    plan = generate.plan_prompts(counts, families, seed=0)
    questions = [item.problem.question for item in plan]
    assert len(set(questions)) == len(questions)
    # Pretend an earlier run wrote test-0000 with the question this plan gives dev-0003.
    taken = next(item for item in plan if item.id == "dev-0003").problem.question
    resumed = generate.plan_prompts(counts, families, seed=0, written={"test-0000": taken})
    new = [item for item in resumed if item.id != "test-0000"]
    assert taken not in [item.problem.question for item in new]
    assert len({item.problem.question for item in new}) == len(new)
    # Prompts whose question is free keep their plan.
    assert [i.problem for i in resumed if i.id == "dev-0000"] == [
        i.problem for i in plan if i.id == "dev-0000"
    ]
