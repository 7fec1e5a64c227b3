"""The short, bounded run of bench/load/scenarios.py in CI: a real server under locust at
its capacity and at 200 %: no 5xx. (SIGTERM under load and a replica killed under a
retrying client have their own tests: test_server_sigterm.py, test_numca_shared_store.py.)"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_short_load_run_has_no_server_errors(embedded_checkpoint: Path) -> None:
    # Not imported here: locust patches the process for gevent (scenarios.py runs it apart).
    if importlib.util.find_spec("locust") is None:
        if os.environ.get("CI"):
            pytest.fail("locust is not installed (the dev extra has it)")
        pytest.skip("locust is not installed (the dev extra has it)")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.load.scenarios",
            "--short",
            "--only",
            "capacity,levels",
            "--model",
            str(embedded_checkpoint),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for title in ("### Capacity", "**200%**", "| http 200 |", "| grpc OK |"):
        assert title in out, out
    assert "failures (5xx, lost or hanging requests, a bad exit): 0" in out
