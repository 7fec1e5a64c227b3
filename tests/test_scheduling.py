"""Scheduling by time: arrival order, cancel that frees admission at once, waits that
admission predicts within 2x.

Servers here run the real warm-up, so the forward-time model starts from its prior as a
fresh replica's does. Times depend on the machine; the checks compare times measured on
the same server with each other (a ratio, a count of micro-batches), never with a fixed
number of seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from statevalue_client.proto import statevalue_pb2_grpc as pb_grpc
from statevalue_client.wire import build_request
from tests.servers import (
    ServerThread,
    hold_model,
    metric_samples,
    metric_value,
    running_server,
    wait_for,
)


def random_group(seed: int, rollouts: int, length: int, prompt: int = 20) -> Group:
    rng = np.random.default_rng(seed)
    return Group(
        prompt_ids=rng.integers(100, 40_000, prompt),
        rollouts=[
            Rollout(rng.integers(100, 40_000, length), float(j % 2)) for j in range(rollouts)
        ],
        group_id=f"g{seed}",
    )


def http_body(group: Group) -> dict[str, object]:
    return {
        "methods": ["hista"],
        "groups": [
            {
                "group_id": group.group_id,
                "prompt_ids": np.asarray(group.prompt_ids).tolist(),
                "rollouts": [
                    {"response_ids": np.asarray(r.response_ids).tolist(), "reward": r.reward}
                    for r in group.rollouts
                ],
            }
        ],
    }


def micro_batch_seconds(server: ServerThread) -> float:
    """The mean measured time of this server's micro-batches so far."""
    page = server.metrics()
    count = metric_value(page, "statevalue_forward_seconds_count")
    return metric_value(page, "statevalue_forward_seconds_sum") / count


def test_a_steps_requests_stay_together_and_run_in_arrival_order(backend: TorchBackend) -> None:
    # One 230-token sequence per micro-batch, so every request has a micro-batch of its own.
    with running_server(backend, max_batch_tokens=256, max_wait_ms=0) as server:
        order: list[str] = []
        lock = threading.Lock()

        def send(name: str, step: str, seed: int) -> None:
            with ValueClient(server.grpc_target, retries=0, timeout=300) as client:
                client.estimate([random_group(seed, 1, 210)], ["hista"], step_id=step)
            with lock:
                order.append(name)

        with ThreadPoolExecutor(4) as pool, hold_model(backend):
            futures = []
            # a1 takes the (held) model; then b1 queues, then a2 of a1's step goes before it.
            for k, (name, step) in enumerate(
                (("a1", "step-a"), ("b1", "step-b"), ("a2", "step-a"), ("c1", ""))
            ):
                futures.append(pool.submit(send, name, step, k))
                wait_for(
                    lambda k=k: metric_value(server.metrics(), "statevalue_queue_depth") == k + 1,
                    60,
                    f"request {name} to be queued",
                )
        for future in futures:
            future.result(timeout=300)
    assert order == ["a1", "a2", "b1", "c1"]


# About 10k tokens: many micro-batches on any device.
LARGE_ROLLOUTS, LARGE_LENGTH = 32, 300


@pytest.fixture(scope="module")
def tight(backend: TorchBackend) -> Iterator[ServerThread]:
    """A warmed-up server whose admission refuses anything queued behind a large request."""
    with running_server(backend, warmup=True, max_queue_wait_s=2.0, max_wait_ms=0) as running:
        yield running


def first_batches(server: ServerThread) -> float:
    """Requests whose first micro-batch has begun."""
    return metric_value(server.metrics(), "statevalue_queue_wait_seconds_count")


def requests(server: ServerThread, frontend: str, rpc: str, status: str) -> float:
    labels = f'{{frontend="{frontend}",rpc="{rpc}",status="{status}"}}'
    return metric_value(server.metrics(), "statevalue_requests_total", labels)


def small_request(server: ServerThread, seed: int) -> None:
    with ValueClient(server.grpc_target, retries=0, timeout=300) as client:
        result = client.estimate([random_group(seed, 2, 40)], ["hista"])
    assert result.groups[0].group_id == f"g{seed}"


@pytest.mark.parametrize("how", ["grpc deadline", "grpc cancel", "http disconnect"])
def test_a_given_up_large_request_frees_the_server_within_a_micro_batch(
    tight: ServerThread, how: str
) -> None:
    server = tight
    large = random_group(100, LARGE_ROLLOUTS, LARGE_LENGTH)
    started = first_batches(server)
    with grpc.insecure_channel(server.grpc_target) as channel, ThreadPoolExecutor(1) as pool:
        stub = pb_grpc.ValueServiceStub(channel)
        request = build_request([large], ["hista"], {})
        if how == "http disconnect":
            gone = requests(server, "http", "estimate", "499")
            post = pool.submit(
                httpx.post,
                f"{server.http_url}/v1/estimate",
                json=http_body(large),
                timeout=httpx.Timeout(600, read=4.0),
            )
        else:
            call = stub.Estimate.future(request, timeout=4.0 if how == "grpc deadline" else 600)
        wait_for(lambda: first_batches(server) > started, 120, "the large request to run")
        # While it runs, a small request does not fit in the 2 s bound.
        with ValueClient(server.grpc_target, retries=0, timeout=60) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.estimate([random_group(1, 2, 40)], ["hista"])
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        if how == "grpc deadline":
            assert call.exception(timeout=60).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        elif how == "grpc cancel":
            cancelled = requests(server, "grpc", "Estimate", "CANCELLED")
            call.cancel()
            wait_for(
                lambda: requests(server, "grpc", "Estimate", "CANCELLED") > cancelled, 60, "cancel"
            )
        else:
            with pytest.raises(httpx.ReadTimeout):
                post.result(timeout=60)
            wait_for(lambda: requests(server, "http", "estimate", "499") > gone, 60, "disconnect")
        # Its tokens left admission at once, though its micro-batch may still be running.
        assert metric_value(server.metrics(), "statevalue_queue_tokens") == 0
        given_up = time.monotonic()
        small_request(server, 2)
        seconds = time.monotonic() - given_up
    micro_batch = micro_batch_seconds(server)
    print(
        f"{how}: the small request was answered {seconds:.2f} s after the large one was given "
        f"up; a micro-batch takes {micro_batch:.2f} s on average here"
    )
    # The rest of the micro-batch running, the small one's own, its estimators: about two
    # micro-batches. Without the cancel the small request waits for all 10k tokens.
    assert seconds < 4 * micro_batch + 2.0


def test_predicted_waits_are_within_2x_of_actual_across_a_mix(backend: TorchBackend) -> None:
    # A fresh, warmed-up replica: the first predictions come from the warm-up's prior.
    with running_server(backend, warmup=True, max_wait_ms=0) as server:
        sizes = [(8, 200), (2, 40), (2, 40), (6, 300), (1, 30), (4, 100), (2, 40), (8, 150)]
        hista = '{method="hista"}'
        with ValueClient(server.grpc_target, retries=0, timeout=600) as client:
            with ThreadPoolExecutor(len(sizes)) as pool:
                futures = []
                for k, (rollouts, length) in enumerate(sizes):
                    group = random_group(k, rollouts, length)
                    futures.append(pool.submit(client.estimate, [group], ["hista"]))
                    # Admitted one by one (a request is counted just before admission),
                    # each behind the ones before it.
                    wait_for(
                        lambda k=k: (
                            metric_value(
                                server.metrics(), "statevalue_method_requests_total", hista
                            )
                            > k
                        ),
                        60,
                        "the request to be admitted",
                    )
                for future in futures:
                    future.result(timeout=600)
        page = server.metrics()
    ratios = metric_samples(page, "statevalue_queue_wait_ratio_bucket")
    compared = metric_value(page, "statevalue_queue_wait_ratio_count")
    predicted = metric_value(page, "statevalue_queue_wait_predicted_seconds_sum")
    actual_over = metric_value(page, "statevalue_queue_wait_ratio_sum")
    print(
        f"{compared:g} waits compared; buckets {ratios}; mean ratio {actual_over / compared:.2f}; "
        f"predicted {predicted:.1f} s in all"
    )
    assert compared >= len(sizes) - 2
    within = ratios['{le="2.0"}'] - ratios['{le="0.5"}']
    assert within == compared


def test_an_empty_queue_admits_even_a_request_past_the_wait_bound(backend: TorchBackend) -> None:
    with running_server(backend, warmup=True, max_queue_wait_s=0.5) as server:
        with ValueClient(server.grpc_target, retries=0, timeout=600) as client:
            # Several micro-batches of work, more than the bound: admitted, nothing is ahead.
            result = client.estimate([random_group(7, 8, 200)], ["hista"])
    assert len(result.groups[0].rollouts) == 8
