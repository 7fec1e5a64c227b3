"""The speed benchmark's smoke configurations and the device parity script, so they never rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


def ratio(lines: list[str], row: str) -> float:
    """The 'x bare' column of a row, after checking its tokens/s is positive."""
    (line,) = [line for line in lines if f" {row} " in line]
    tokens_per_s, times_bare = line.split(row)[1].split()[:2]
    assert float(tokens_per_s) > 0
    return float(times_bare)


@pytest.mark.slow
def test_perf_smoke_prints_every_row(embedded_checkpoint: Path) -> None:
    lines = run_module("bench.perf", "--smoke", "--model", str(embedded_checkpoint))
    assert lines[0].startswith("# statevalue perf") and "cores" in lines[0]
    assert "SmolLM2-135M-Instruct" in lines[1] and "device cpu" in lines[1]
    assert ratio(lines, "bare forward") == 1.0
    assert "backends torch (default path padded)" in lines[2]
    for row in ("bare prompt-once", "torch padded", "torch packed", "torch prompt_once",
                "torch engine", "torch grpc x1", "torch grpc x2", "torch http"):  # fmt: skip
        assert ratio(lines, row) > 0
    assert any("hista alone" in line and "of the bare forward" in line for line in lines)


@pytest.mark.slow
def test_perf_runs_a_random_init_model() -> None:
    lines = run_module("bench.perf", "--smoke", "--random-init", "tiny", "--no-server")
    assert "model random-init tiny" in lines[1]
    assert ratio(lines, "torch prompt_once") > 0
    assert not any("grpc" in line for line in lines)


@pytest.mark.slow
def test_device_parity_on_cpu_is_exact_to_float32(embedded_checkpoint: Path) -> None:
    lines = run_module(
        "bench.device_parity", "--device", "cpu", "--dtypes", "float32",
        "--responses", "4", "--max-new", "16", "--model", str(embedded_checkpoint),
    )  # fmt: skip
    rows = [line.split() for line in lines if line.startswith("cpu ")]
    assert [row[2] for row in rows] == ["padded", "packed", "prompt_once"]
    for row in rows:
        relative, values = float(row[4]), float(row[5])
        assert relative < 1e-5 and values < 1e-5
