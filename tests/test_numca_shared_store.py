"""Two replicas share Numca's tables in a real Redis; one, a ``statevalue serve`` process,
is killed with SIGKILL in the middle of a step. The step completes with the values one
process computes (retried requests count nothing twice), and the replica restarted on its
ports finds its tables intact. The other replica and the restarted one run in this
process: only the killed one needs a process of its own. A memory store's snapshot
survives a clean restart too (in process).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from threading import Event

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue.config import EstimatorConfig
from statevalue.engine import Engine
from statevalue.schema import EstimateRequest, GroupInput, RolloutInput
from statevalue_client import EstimateResult, Group, Rollout, StepProgress, ValueClient
from tests.servers import (
    RedisServer,
    Serve,
    metric_value,
    running_server,
    serve_ready,
    wait_for,
)

GROUPS, G, PROMPT = 16, 4, 12
METHODS = ("numca", "group_mean", "hista")
PARAMS = {"hista": {"node_spacing": 5, "stride": 2}}
# A busy 2-core machine measures a low warm-up throughput; admission by time is not tested.
SETTINGS = {"max_request_tokens": 300, "max_groups_per_request": 2, "max_queue_wait_s": 1e9}
FLAGS = [
    item for name, value in SETTINGS.items() for item in (f"--{name.replace('_', '-')}", str(value))
]


def step(seed: int) -> list[Group]:
    """GROUPS groups (two per prompt_id) of G random rollouts, rewards 0/1."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, 40_000, PROMPT).astype(np.int32) for _ in range(GROUPS // 2)]
    return [
        Group(
            prompt_ids=prompts[i // 2],
            rollouts=[
                Rollout(rng.integers(100, 40_000, rng.integers(10, 30)).astype(np.int32), j % 2)
                for j in range(G)
            ],
            group_id=f"{seed}-{i}",
            prompt_id=f"prompt-{i // 2}",
        )
        for i in range(GROUPS)
    ]


def one_process(engine: Engine, groups: list[Group]) -> EstimateResult:
    request = EstimateRequest(
        groups=[
            GroupInput(
                prompt_ids=np.asarray(g.prompt_ids),
                rollouts=[
                    RolloutInput(np.asarray(r.response_ids), reward=r.reward) for r in g.rollouts
                ],
                group_id=g.group_id,
                prompt_id=g.prompt_id,
            )
            for g in groups
        ],
        methods=METHODS,
        config=EstimatorConfig.model_validate(PARAMS),
    )
    return Engine(engine.backend).estimate(request)  # type: ignore[return-value]


def assert_values(
    result: EstimateResult, expected: EstimateResult, methods: tuple[str, ...] = METHODS
) -> None:
    for got, want in zip(result.groups, expected.groups, strict=True):
        assert got.group_id == want.group_id
        for rollout, reference in zip(got.rollouts, want.rollouts, strict=True):
            for method in methods:
                rtol, atol = (1e-4, 1e-5) if method == "hista" else (1e-6, 1e-7)
                np.testing.assert_allclose(
                    rollout.values[method], reference.values[method], rtol=rtol, atol=atol
                )


def wait_ready(serve: Serve) -> None:
    wait_for(lambda: serve_ready(serve[0], serve[2]), timeout=600, what="serve to be ready")


@pytest.mark.slow
def test_a_replica_killed_mid_step(
    start_serve: Callable[..., Serve],
    redis_server: RedisServer,
    backend: TorchBackend,
    engine: Engine,
) -> None:
    settings = {"numca_store": redis_server.url, **SETTINGS}
    victim = start_serve("--numca-store", redis_server.url, *FLAGS)
    groups = step(0)
    first_answer = Event()

    def progress(update: StepProgress) -> None:
        first_answer.set()

    with running_server(backend, **settings) as survivor:
        wait_ready(victim)
        target = f"ipv4:127.0.0.1:{victim[1]},{survivor.grpc_target}"
        with ValueClient(target, max_in_flight=2, retries=6, timeout=300) as client:
            with ThreadPoolExecutor(1) as threads:
                running = threads.submit(
                    client.estimate, groups, METHODS, progress=progress, **PARAMS
                )
                assert first_answer.wait(timeout=300)
                still_running = not running.done()
                victim[0].send_signal(signal.SIGKILL)
                result = running.result(timeout=600)
    assert still_running, "the step ended before the kill; it proves nothing"
    assert victim[0].wait(timeout=30) == -signal.SIGKILL
    expected = one_process(engine, groups)
    assert_values(result, expected)

    # The replica comes back on its ports and finds every table in Redis: resending the
    # step (all of it already counted) answers the same values and counts nothing. Only
    # Numca's tables live in Redis, so the model-free methods show it.
    model_free = ("numca", "group_mean")
    with running_server(backend, grpc_port=victim[1], http_port=victim[2], **settings) as back:
        with ValueClient(f"127.0.0.1:{victim[1]}", timeout=300) as client:
            again = client.estimate(groups, model_free, **PARAMS)
        page = back.metrics()
    assert_values(again, expected, model_free)
    assert metric_value(page, "statevalue_numca_groups_total", '{outcome="repeated"}') == GROUPS
    assert metric_value(page, "statevalue_numca_groups_total", '{outcome="counted"}') == 0
    assert metric_value(page, "statevalue_numca_tables") == GROUPS // 2


def test_a_memory_snapshot_survives_a_clean_restart(backend: TorchBackend, tmp_path: Path) -> None:
    snapshot = tmp_path / "numca.json"
    groups = step(1)
    with running_server(backend, numca_snapshot=snapshot) as server:
        with ValueClient(server.grpc_target, timeout=300) as client:
            before = client.estimate(groups, ("numca",))
    assert snapshot.exists()
    with running_server(backend, numca_snapshot=snapshot) as server:
        # The first prompt's two groups again: counted before the restart, so they count
        # nothing now and read the saved table's values.
        with ValueClient(server.grpc_target, timeout=300) as client:
            after = client.estimate(groups[:2], ("numca",))
        page = server.metrics()
    assert metric_value(page, "statevalue_numca_tables") == GROUPS // 2
    assert metric_value(page, "statevalue_numca_groups_total", '{outcome="repeated"}') == 2
    for got, want in zip(after.groups, before.groups[:2], strict=True):
        for rollout, reference in zip(got.rollouts, want.rollouts, strict=True):
            np.testing.assert_array_equal(rollout.values["numca"], reference.values["numca"])


def test_a_redis_outage_answers_unavailable_then_recovers(
    backend: TorchBackend, redis_server: RedisServer
) -> None:
    group = step(2)[0]
    body = {
        "methods": ["numca"],
        "groups": [
            {
                "group_id": group.group_id,
                "prompt_id": group.prompt_id,
                "prompt_ids": np.asarray(group.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in group.rollouts
                ],
            }
        ],
    }
    with running_server(backend, numca_store=redis_server.url) as server:
        url = f"{server.http_url}/v1/estimate"
        assert httpx.post(url, json=body, timeout=60).status_code == 200
        redis_server.kill()
        down = httpx.post(url, json=body, timeout=60)
        with ValueClient(server.grpc_target, retries=0, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.estimate([group], ("numca",))
        # Requests without a prompt_id do not need the store.
        alone = {**body, "groups": [{**body["groups"][0], "prompt_id": None}]}
        assert httpx.post(url, json=alone, timeout=60).status_code == 200
        redis_server.start()
        back = httpx.post(url, json=body, timeout=60)
        page = server.metrics()
    assert down.status_code == 503
    assert "Numca store" in down.json()["detail"]["message"]
    assert down.headers.get("retry-after")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unavailable" in (caught.value.details() or "")
    assert back.status_code == 200
    # The first send was counted; the retry after the outage repeated it.
    assert metric_value(page, "statevalue_numca_groups_total", '{outcome="counted"}') == 1
    assert metric_value(page, "statevalue_numca_groups_total", '{outcome="repeated"}') == 1
