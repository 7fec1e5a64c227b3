"""The Ray Serve deployment on a local CPU Ray: answers equal the in-process engine's, and
its calls take the server's own estimate path (API token, error table, metrics)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from tests.conftest import import_or_skip

ray = import_or_skip("ray")
serve = import_or_skip("ray.serve")

from statevalue.admin import Unauthenticated  # noqa: E402
from statevalue.api_models import EstimateIn  # noqa: E402
from statevalue.backends.torch_backend import TorchBackend  # noqa: E402
from statevalue.engine import Engine  # noqa: E402
from statevalue.metrics import Metrics  # noqa: E402
from statevalue.ray_serve import StatevalueDeployment, build_app  # noqa: E402
from statevalue.scheduler import Scheduler  # noqa: E402
from statevalue.server import StatevalueServer  # noqa: E402
from statevalue.settings import ServerSettings  # noqa: E402
from tests.servers import free_port, metric_value  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"
PARAMS = {"hista": {"node_spacing": 4}}
TOKEN = "ray-s3cret"
AUTHORIZATION = f"Bearer {TOKEN}"
HTTP_401 = '{frontend="http",rpc="estimate",status="401"}'
RAY_401 = '{frontend="ray",rpc="estimate",status="401"}'


def written_group() -> dict[str, Any]:
    """One group of fixed token ids: four responses of 12-30 tokens, mixed rewards."""
    rng = np.random.default_rng(14)
    rollouts = [
        {"response_ids": rng.integers(20, 5000, size=n).tolist(), "reward": reward}
        for n, reward in [(30, 1.0), (12, 0.0), (24, 1.0), (18, 0.0)]
    ]
    return {
        "group_id": "g",
        "prompt_ids": rng.integers(20, 5000, size=10).tolist(),
        "rollouts": rollouts,
    }


def test_serve_config_names_the_builder_and_valid_settings(embedded_checkpoint: Path) -> None:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    module, name = app["import_path"].split(":")
    assert (module, name) == ("statevalue.ray_serve", "build_app")
    # Every argument is a real setting with a valid value; the model path is the nodes'.
    assert Path(app["args"]["model"]).is_absolute()
    ServerSettings(**{**app["args"], "model": str(embedded_checkpoint)})
    (deployment,) = app["deployments"]
    assert deployment["name"] == StatevalueDeployment.name
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    assert app["args"]["device"] == "cuda"


def test_health_check_fails_while_a_forward_step_hangs() -> None:
    """Ray Serve's check_health applies the scheduler's stall rule (no Ray, no model)."""
    # The class itself, under Ray's ingress wrapper (whose async __del__ needs Ray).
    (replica_class, _) = StatevalueDeployment.func_or_class.__bases__
    replica = replica_class.__new__(replica_class)
    replica.settings = ServerSettings(liveness_stall_s=5)
    replica.server = StatevalueServer(replica.settings)
    scheduler = Scheduler(engine=None, metrics=Metrics())  # type: ignore[arg-type]
    replica.server.scheduler = scheduler
    replica.check_health()  # not started, no step running
    scheduler._step_started = time.monotonic() - 1
    replica.check_health()  # a step running for less than the limit
    scheduler._step_started = time.monotonic() - 6
    with pytest.raises(RuntimeError, match="forward step has run for more than 5 s"):
        replica.check_health()


@pytest.fixture(scope="module")
def ray_app(embedded_checkpoint: Path) -> Iterator[tuple[Any, str]]:
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {
            "model": str(embedded_checkpoint),
            "device": "cpu",
            "warmup": False,
            "max_wait_ms": 0,
            "api_token": TOKEN,
        }
        handle = serve.run(build_app(settings), name="statevalue", route_prefix="/statevalue")
        yield handle, f"http://127.0.0.1:{port}/statevalue"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_handle_and_http_answer_like_the_engine(
    ray_app: tuple[Any, str], embedded_checkpoint: Path
) -> None:
    handle, url = ray_app
    body = {"methods": ["group_mean", "numca", "hista"], "params": PARAMS}
    body["groups"] = [written_group()]
    engine = Engine(TorchBackend(str(embedded_checkpoint), device="cpu"))
    expected = engine.estimate(EstimateIn.model_validate(body).to_request())

    # The torch backend answers, on its default path.
    model = httpx.get(f"{url}/v1/model", timeout=60).json()
    assert (model["name"], model["backend"], model["forward_path"]) == (
        embedded_checkpoint.name,
        "torch",
        "padded",
    )
    answer = handle.estimate.remote(body, authorization=AUTHORIZATION).result(timeout_s=120)
    over_http = httpx.post(
        f"{url}/v1/estimate", json=body, headers={"Authorization": AUTHORIZATION}, timeout=120
    )
    assert over_http.status_code == 200
    for got in (answer, over_http.json()):
        assert got["model"]["name"] == expected.model.name
        assert got["model"]["version"] == expected.model.version
        (group,) = got["groups"]
        rollouts = expected.groups[0].rollouts
        assert len(group["rollouts"]) == len(rollouts)
        for out, want in zip(group["rollouts"], rollouts, strict=True):
            for method in body["methods"]:
                np.testing.assert_allclose(out["values"][method], want.values[method], atol=1e-4)
                np.testing.assert_allclose(
                    out["advantages"][method], want.advantages[method], atol=1e-4
                )


@pytest.mark.slow
def test_http_errors_name_the_field(ray_app: tuple[Any, str]) -> None:
    _, url = ray_app
    body = {"methods": ["hista"], "groups": [{"prompt_ids": [1, 2], "rollouts": []}]}
    headers = {"Authorization": AUTHORIZATION}
    response = httpx.post(f"{url}/v1/estimate", json=body, headers=headers, timeout=60)
    assert response.status_code == 400
    assert response.json()["detail"]["field"].startswith("groups[0]")
    response = httpx.post(f"{url}/v1/estimate", json={"groups": "none"}, timeout=60)
    assert response.status_code == 422


@pytest.mark.slow
def test_a_call_without_the_api_token_is_refused_and_counted(ray_app: tuple[Any, str]) -> None:
    handle, url = ray_app
    body = {"methods": ["group_mean"], "groups": [written_group()]}
    response = httpx.post(f"{url}/v1/estimate", json=body, timeout=60)
    assert response.status_code == 401
    assert "API token" in response.json()["detail"]["message"]
    wrong = httpx.post(
        f"{url}/v1/estimate", json=body, headers={"Authorization": "Bearer nope"}, timeout=60
    )
    assert wrong.status_code == 401
    with pytest.raises(Unauthenticated):
        handle.estimate.remote(body).result(timeout_s=60)
    # One replica: its /metrics counts the refusals of both paths as 401s.
    page = httpx.get(f"{url}/metrics", timeout=60).text
    assert metric_value(page, "statevalue_requests_total", HTTP_401) == 2
    assert metric_value(page, "statevalue_requests_total", RAY_401) == 1
