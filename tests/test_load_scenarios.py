"""The short, bounded run of bench/load/scenarios.py: real servers, locust, SIGTERM under
load and a replica killed under a retrying client; no 5xx, nothing lost or left hanging."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_the_short_load_scenarios_lose_nothing() -> None:
    # Not imported here: locust patches the process for gevent (scenarios.py runs it apart).
    if importlib.util.find_spec("locust") is None:
        pytest.skip("locust is not installed (the dev extra has it)")
    done = subprocess.run(
        [sys.executable, "-m", "bench.load.scenarios", "--short"],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for title in ("### Capacity", "**200%**", "### SIGTERM under load", "killed with SIGKILL"):
        assert title in out, out
    assert "Exit code 0" in out and "every client thread ended: True" in out
    assert "calls lost: 0" in out
    assert "failures (5xx, lost or hanging requests, a bad exit): 0" in out
