"""schemathesis against the server's own /openapi.json, bounded: no 5xx, and a success
never carries a non-finite number. The schema's example is a valid request, so the fuzzing
reaches the 200 path as well as the refusals."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from statevalue.backends.torch_backend import TorchBackend
from tests.servers import ServerThread, running_server

ATTEMPTS: list[str] = []
SUCCESSES: list[str] = []


@pytest.fixture(scope="module")
def http_server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as server:
        yield server


@pytest.fixture(scope="module")
def api_schema(http_server: ServerThread) -> schemathesis.BaseSchema:
    spec = httpx.get(f"{http_server.http_url}/openapi.json", timeout=30).json()
    return schemathesis.openapi.from_dict(spec)


schema = schemathesis.pytest.from_fixture("api_schema")


def _all_finite(tree: object) -> bool:
    if isinstance(tree, dict):
        return all(_all_finite(v) for v in tree.values())
    if isinstance(tree, list):
        return all(_all_finite(v) for v in tree)
    if isinstance(tree, float):
        return math.isfinite(tree)
    return tree is not None


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_or_answers_non_finite(
    case: schemathesis.Case, http_server: ServerThread
) -> None:
    ATTEMPTS.append(case.path)
    response = case.call(base_url=http_server.http_url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error])
    if case.path == "/v1/estimate" and response.status_code == 200:
        body = response.json()
        assert _all_finite(body["groups"]), body
        SUCCESSES.append(case.path)


def test_fuzzing_reached_successful_estimates() -> None:
    if "/v1/estimate" not in ATTEMPTS:
        pytest.skip("runs after the fuzz test above")
    assert "/v1/estimate" in SUCCESSES
