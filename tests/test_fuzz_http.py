"""schemathesis against the server's own /openapi.json, bounded: no 5xx, and a success
never carries a non-finite number. The schema's example is a valid request, so the fuzzing
reaches the 200 path as well as the refusals."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from statevalue.backends.torch_backend import TorchBackend
from statevalue.http_server import create_app
from statevalue.metrics import Metrics
from tests.servers import ServerThread, running_server

# The operations, from the app's schema (the served one is fetched in the test).
OPERATIONS = [
    (operation.ok().method, operation.ok().path)
    for operation in schemathesis.openapi.from_dict(
        create_app(None, Metrics(), max_body_bytes=1 << 20).openapi()
    ).get_all_operations()
]
BOUNDED = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)


@pytest.fixture(scope="module")
def http_server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as server:
        yield server


def _all_finite(tree: object) -> bool:
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(_all_finite(v) for v in tree)
    if isinstance(tree, float):
        return math.isfinite(tree)
    return tree is not None


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_api_never_fails_or_answers_non_finite(
    http_server: ServerThread, method: str, path: str
) -> None:
    spec = httpx.get(f"{http_server.http_url}/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    (operation,) = [
        o.ok()
        for o in schema.get_all_operations()
        if (o.ok().method, o.ok().path) == (method, path)
    ]
    successes: list[int] = []

    def call(case: schemathesis.Case) -> None:
        response = case.call(base_url=http_server.http_url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code == 200:
            successes.append(1)
            if path == "/v1/estimate":
                body = response.json()
                assert _all_finite(body["groups"]), body

    def run(cases: st.SearchStrategy[schemathesis.Case], examples: int) -> None:
        @settings(BOUNDED, max_examples=examples)
        @given(case=cases)
        def each(case: schemathesis.Case) -> None:
            call(case)

        each()

    examples = operation.get_strategies_from_examples()
    if examples:
        run(st.one_of(*examples), 5)
        if path == "/v1/estimate":
            assert successes, "the schema's example request should succeed"
    run(
        st.one_of(
            operation.as_strategy(schemathesis.GenerationMode.POSITIVE),
            operation.as_strategy(schemathesis.GenerationMode.NEGATIVE),
        ),
        40,
    )
