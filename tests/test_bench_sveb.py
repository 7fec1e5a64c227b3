"""Smoke run of the SVEB benchmark scripts: a tiny set, then the in-process evaluation."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from bench.sveb import evaluate, generate
from statevalue.backends.torch_backend import TorchBackend

METHODS = (
    "group mean",
    "numca digits (ref)",
    "numca decimal (ref)",
    "numca calibrated",
    "hista (ref)",
    "hista calibrated",
    "proto: hista relative d_min",
    "proto: numca shrunk",
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
    argv = ["--out-dir", str(tmp_path), "--dev", "0", "--test", "1", "--train", "1"]
    # K = 3: the 2-sample Monte Carlo floor needs at least one continuation left over.
    argv += ["-G", "4", "-K", "3", "--max-new-tokens", "24", "--no-progress"]
    assert generate.main(argv, backend=backend) == 0
    assert (tmp_path / "test.jsonl").exists() and (tmp_path / "train.jsonl").exists()
    # Resuming a complete set does nothing.
    assert generate.main(argv, backend=backend) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 1

    capsys.readouterr()
    argv = ["--in-process", "--data-dir", str(tmp_path), "--split", "test", "--by-family"]
    assert evaluate.main([*argv, "--prototypes", "--quiet"], backend=backend) == 0
    out = capsys.readouterr().out
    summary = out.split("MAE by family")[0]
    for method in METHODS:
        row = re.search(rf"^\| {re.escape(method)} \| ([0-9.]+) ± ([0-9.na]+) \|", summary, re.M)
        assert row is not None, f"no row for {method}:\n{out}"
        assert math.isfinite(float(row.group(1)))
    assert "MAE by family" in out
