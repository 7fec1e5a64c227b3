"""Load on one statevalue server: an HTTP user and a gRPC user sending the same mix.

Each request is one group of 4 rollouts x 64 response tokens after a 32-token prompt,
rewards 0/1, all three methods: the shape of the capacity figures in docs/reliability.md.

    pip install -e ".[load]"
    statevalue serve --device cpu &
    locust -f bench/load/locustfile.py --headless -u 8 -r 8 -t 60s \\
        --host http://127.0.0.1:8000 --grpc-target 127.0.0.1:50051 --csv load

Requests are closed-loop (each user waits for its answer, then sends the next), so the
number of users sets the offered load; ``--think-s`` adds a pause between requests.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np
from locust import HttpUser, User, between, events, task
from locust.env import Environment

from statevalue_client import Group, Rollout, ValueClient

PROMPT_TOKENS, ROLLOUTS, RESPONSE_TOKENS = 32, 4, 64
METHODS = ("numca", "hista", "group_mean")


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--grpc-target", default="127.0.0.1:50051", help="gRPC host:port")
    parser.add_argument("--think-s", type=float, default=0.0, help="pause between requests")


def make_group(rng: np.random.Generator) -> Group:
    """One random group of in-vocabulary ids (the embedded model's vocabulary is 49152)."""
    ids = rng.integers(100, 40_000, size=PROMPT_TOKENS + ROLLOUTS * RESPONSE_TOKENS)
    prompt, responses = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS:].reshape(ROLLOUTS, -1)
    return Group(
        prompt_ids=prompt.astype(np.int32),
        rollouts=[Rollout(r.astype(np.int32), float(j % 2)) for j, r in enumerate(responses)],
        group_id="load",
    )


def as_json(group: Group) -> dict[str, Any]:
    return {
        "methods": list(METHODS),
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


def _think(environment: Environment) -> float:
    return float(environment.parsed_options.think_s) if environment.parsed_options else 0.0


class EstimateHttpUser(HttpUser):
    """POST /v1/estimate; a 429 or 503 is a refusal (counted as a failure by its code)."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()

    @task
    def estimate(self) -> None:
        body = as_json(make_group(self.rng))
        with self.client.post(
            "/v1/estimate", json=body, name="http estimate", catch_response=True, timeout=300
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
        time.sleep(_think(self.environment))


class EstimateGrpcUser(User):
    """Estimate over gRPC through the Python client (no retries: refusals are counted)."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.rng = np.random.default_rng()
        target = self.environment.parsed_options.grpc_target
        self.client = ValueClient(target, retries=0, timeout=300)

    def on_stop(self) -> None:
        self.client.close()

    @task
    def estimate(self) -> None:
        group = make_group(self.rng)
        started = time.perf_counter()
        error: Exception | None = None
        try:
            self.client.estimate([group], METHODS)
        except grpc.RpcError as exc:
            error = Exception(f"gRPC {exc.code().name}")
        self.environment.events.request.fire(
            request_type="grpc",
            name="grpc estimate",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=error,
            context={},
        )
        time.sleep(_think(self.environment))
