"""The whole-step benchmark's smoke configuration, so the script never rots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_step_smoke_prints_every_row(embedded_checkpoint: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.step",
            "--smoke",
            "--threads",
            "1",
            "--model",
            str(embedded_checkpoint),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("# statevalue step") and "cores" in lines[0]
    rows = [line.split() for line in lines if line.startswith(("numca", "hista"))]
    assert [(row[0], row[2]) for row in rows] == [
        ("numca+group_mean", "1"),
        ("numca+group_mean", "2"),
        ("hista", "1"),
        ("hista", "2"),
    ]
    for row in rows:
        requests, tokens, wall, first = int(row[3]), int(row[4]), float(row[5]), float(row[6])
        # The smoke step is split over several requests under the replicas' limit, and the
        # first of them reports progress before the step ends.
        assert requests > 1 and tokens > 0 and float(row[7]) > 0
        assert 0 < first <= wall
    for row in rows[2:]:
        assert float(row[8]) > 0 and row[9].endswith("%")  # Hista runs the model
