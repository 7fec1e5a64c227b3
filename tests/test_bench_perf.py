"""The speed benchmark's smoke configuration, so the script never rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_perf_smoke_prints_every_row() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# statevalue perf") and "cores" in lines[0]
    for row in ("(a) forward", "(b) engine", "(c) grpc x1", "(c) grpc x2", "(d) http"):
        (line,) = [line for line in lines if row in line]
        tokens_per_s = float(line.split(row)[1].split()[0])
        assert tokens_per_s > 0
    assert any("hista alone" in line and "of the forward pass" in line for line in lines)
