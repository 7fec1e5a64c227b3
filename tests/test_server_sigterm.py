"""``statevalue serve`` as a process: SIGTERM lets an in-flight request finish, exit code 0;
with more work queued than the grace period, the oldest requests finish and the rest are
answered "draining" in time."""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from statevalue_client import Group, Rollout, ValueClient
from tests.servers import Serve, metric_value, serve_ready, wait_for

ROLLOUTS, LENGTH = 8, 300


@pytest.fixture
def serve_process(start_serve: Callable[..., Serve]) -> Serve:
    """A ``statevalue serve`` subprocess with a long grace period."""
    return start_serve("--shutdown-grace-s", "300")


def _status(http_port: int, path: str) -> int | None:
    """The HTTP status of ``path``, or None when nothing listens."""
    try:
        return httpx.get(f"http://127.0.0.1:{http_port}{path}", timeout=5).status_code
    except httpx.TransportError:
        return None


def _queued(http_port: int) -> bool:
    page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return metric_value(page, "statevalue_queue_depth") >= 1


@pytest.mark.slow
def test_sigterm_drains_the_in_flight_request(serve_process: Serve) -> None:
    process, grpc_port, http_port, log = serve_process
    wait_for(lambda: serve_ready(process, http_port), timeout=300, what="serve to be ready")
    # Any in-vocabulary ids do: the subprocess has its own model, this test needs none.
    ids = np.random.default_rng(0).integers(100, 40_000, size=(ROLLOUTS + 1, LENGTH))
    group = Group(
        prompt_ids=ids[0, :40].astype(np.int32),
        rollouts=[Rollout(ids[j + 1].astype(np.int32), float(j % 2)) for j in range(ROLLOUTS)],
        group_id="long",
    )
    with ValueClient(f"127.0.0.1:{grpc_port}", retries=0, timeout=600) as client:
        with ThreadPoolExecutor(1) as threads:
            answer = threads.submit(client.estimate, [group], ["hista", "group_mean"])
            wait_for(lambda: _queued(http_port), timeout=60, what="the request to be accepted")
            in_flight = not answer.done()
            process.send_signal(signal.SIGTERM)
            # Draining: not ready, still alive, and HTTP still answers until the work is done.
            wait_for(lambda: _status(http_port, "/readyz") == 503, timeout=30, what="503")
            assert _status(http_port, "/healthz") == 200
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            still_in_flight = not answer.done()
            result = answer.result(timeout=600)
    assert process.wait(timeout=300) == 0, log.read_text()
    output = log.read_text()
    assert "shutting down" in output and "stopped (drained)" in output
    assert in_flight and still_in_flight
    assert result.model.name == "SmolLM2-135M-Instruct"
    (out,) = result.groups
    assert out.group_id == "long" and len(out.rollouts) == ROLLOUTS
    for j, rollout in enumerate(out.rollouts):
        for method in ("hista", "group_mean"):
            assert rollout.values[method].shape == (LENGTH,)
            assert rollout.advantages[method].shape == (LENGTH,)
            assert np.isfinite(rollout.values[method]).all()
        # Group-mean advantage = (R - mean) / std: rewards alternate 0, 1.
        assert np.sign(rollout.advantages["group_mean"][0]) == (1 if j % 2 else -1)
    # The port is closed once the process is gone.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=2)


@pytest.mark.slow
def test_sigterm_during_the_model_load_exits_without_waiting_for_it(
    start_serve: Callable[..., Serve],
) -> None:
    # The GGUF file: seconds of de-quantisation, a load long enough to be interrupted.
    process, _, http_port, log = start_serve("--model", "embedded", "--shutdown-grace-s", "5")
    wait_for(lambda: _status(http_port, "/healthz") == 200, timeout=120, what="front ends")
    assert _status(http_port, "/readyz") == 503, "the model loaded before the signal"
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    assert process.wait(timeout=60) == 0, log.read_text()
    output = log.read_text()
    assert "stopped (drained)" in output
    # It did not wait for the load to finish, which would have logged the model as loaded.
    assert " loaded on " not in output, output
    assert time.monotonic() - signalled < 5 + 3


def _tokens(http_port: int) -> float:
    """Tokens the server's model has run so far (its /metrics)."""
    page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
    return metric_value(page, "statevalue_tokens_total")


@pytest.mark.slow
def test_sigterm_with_48_queued_finishes_the_oldest_and_refuses_the_rest(
    start_serve: Callable[..., Serve], tmp_path: Path, embedded_checkpoint: Path
) -> None:
    grace = 12.0
    admin_file = tmp_path / "admin-token"
    admin_file.write_text("admin-secret-5d1e\n")
    api_token = "api-secret-c27a"
    process, _, http_port, log = start_serve(
        "--model",
        str(embedded_checkpoint),
        "--shutdown-grace-s",
        str(grace),
        # No time bound on admission: all 48 requests queue.
        "--max-queue-wait-s",
        "1e9",
        "--admin-token-file",
        str(admin_file),
        env={"STATEVALUE_API_TOKEN": api_token},
    )
    wait_for(lambda: serve_ready(process, http_port), timeout=600, what="serve to be ready")
    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(48):
        ids = rng.integers(100, 40_000, size=(5, 64)).tolist()
        bodies.append(
            {
                "methods": ["hista"],
                "groups": [
                    {
                        "prompt_ids": ids[0][:32],
                        "rollouts": [
                            {"response_ids": r, "reward": float(j % 2)}
                            for j, r in enumerate(ids[1:])
                        ],
                    }
                ],
            }
        )
    request_tokens = 4 * (32 + 64)
    headers = {"authorization": f"Bearer {api_token}"}
    url = f"http://127.0.0.1:{http_port}/v1/estimate"

    def post(body: dict[str, object]) -> tuple[httpx.Response, float]:
        response = httpx.post(url, json=body, headers=headers, timeout=300)
        return response, time.monotonic()

    with ThreadPoolExecutor(48) as threads:
        posts = [threads.submit(post, body) for body in bodies]
        wait_for(
            lambda: (
                metric_value(
                    httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text,
                    "statevalue_method_requests_total",
                    '{method="hista"}',
                )
                == 48
            ),
            timeout=120,
            what="48 requests to be accepted",
        )
        page = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=10).text
        rate = metric_value(page, "statevalue_throughput_tokens_per_second")
        at_signal = _tokens(http_port)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The front ends answer until the drain ends: the last count seen is what the model
        # ran in the drain (at least).
        ran = at_signal
        while not all(p.done() for p in posts):
            try:
                ran = _tokens(http_port)
            except httpx.TransportError:
                break
            time.sleep(0.2)
        answers = [p.result(timeout=300) for p in posts]
    assert process.wait(timeout=120) == 0, log.read_text()
    exit_seconds = time.monotonic() - signalled
    codes = [a.status_code for a, _ in answers]
    assert set(codes) <= {200, 503}, [a.text for a, _ in answers]
    drained = [a for a, _ in answers if a.status_code == 503]
    assert drained, "the grace should not cover 48 requests"
    assert all("draining" in a.json()["detail"]["message"] for a in drained)
    completed = sum(1 for a, at in answers if a.status_code == 200 and at > signalled)
    # Those whose estimated wait was far past the grace were refused at once.
    first_refusal = min(at for a, at in answers if a.status_code == 503) - signalled
    # What the model ran during the drain would have finished this many requests, had it
    # gone to whole requests: the oldest first means nearly all of it did (one request may
    # be part-done at each end).
    allowed = (ran - at_signal) / request_tokens
    print(
        f"drain: {completed} requests completed in the {grace:g} s grace, {len(drained)} "
        f"refused; the model ran {ran - at_signal:.0f} tokens ({allowed:.1f} requests' "
        f"worth); throughput measured before the signal {rate:.0f} tokens/s "
        f"({rate * grace / request_tokens:.1f} requests in the grace); exit after "
        f"{exit_seconds:.1f} s; the first 503 came {first_refusal:.1f} s after the signal"
    )
    assert completed >= math.floor(0.8 * allowed) - 1, (completed, allowed)
    # The process does not wait for the forward step still running on the model thread.
    assert exit_seconds < grace + 3, exit_seconds
    output = log.read_text()
    # What could not start in time was refused at the signal; the drain ended either when
    # the rest was answered or, when some was still running, at the grace (refused then).
    cut_at_the_grace = [
        a for a, at in answers if a.status_code == 503 and at > signalled + grace / 2
    ]
    if cut_at_the_grace:
        assert "stopped (drain timed out)" in output
    else:
        assert "stopped (drained)" in output
    assert "admin-secret-5d1e" not in output and api_token not in output
