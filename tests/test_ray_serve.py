"""The Ray Serve deployment on a local CPU Ray: answers equal the in-process engine's."""

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

from statevalue.api_models import EstimateIn  # noqa: E402
from statevalue.engine import Engine  # noqa: E402
from statevalue.metrics import Metrics  # noqa: E402
from statevalue.ray_serve import StatevalueDeployment, build_app  # noqa: E402
from statevalue.scheduler import Scheduler  # noqa: E402
from statevalue.settings import ServerSettings  # noqa: E402
from tests.servers import free_port  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"
PARAMS = {"hista": {"node_spacing": 4}}


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


def test_serve_config_names_the_builder_and_valid_settings() -> None:
    (app,) = yaml.safe_load(CONFIG.read_text())["applications"]
    module, name = app["import_path"].split(":")
    assert (module, name) == ("statevalue.ray_serve", "build_app")
    ServerSettings(**app["args"])  # every argument is a real setting with a valid value
    (deployment,) = app["deployments"]
    assert deployment["name"] == StatevalueDeployment.name
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    assert app["args"]["device"] == "cuda"


def test_health_check_fails_while_a_forward_step_hangs() -> None:
    """Ray Serve's check_health applies the scheduler's stall rule (no Ray, no model)."""
    replica = StatevalueDeployment.func_or_class.__new__(StatevalueDeployment.func_or_class)
    replica.settings = ServerSettings(liveness_stall_s=5)
    replica.scheduler = Scheduler(engine=None, metrics=Metrics())  # type: ignore[arg-type]
    replica.check_health()  # not started, no step running
    replica.scheduler._step_started = time.monotonic() - 1
    replica.check_health()  # a step running for less than the limit
    replica.scheduler._step_started = time.monotonic() - 6
    with pytest.raises(RuntimeError, match="forward step has run for more than 5 s"):
        replica.check_health()


@pytest.fixture(scope="module")
def ray_app() -> Iterator[tuple[Any, str]]:
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"device": "cpu", "warmup": False, "max_wait_ms": 0})
        handle = serve.run(app, name="statevalue", route_prefix="/statevalue")
        yield handle, f"http://127.0.0.1:{port}/statevalue"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.mark.slow
def test_handle_and_http_answer_like_the_engine(ray_app: tuple[Any, str], engine: Engine) -> None:
    handle, url = ray_app
    body = {"methods": ["group_mean", "numca", "hista"], "params": PARAMS}
    body["groups"] = [written_group()]
    expected = engine.estimate(EstimateIn.model_validate(body).to_request())

    answer = handle.estimate.remote(body).result(timeout_s=120)
    over_http = httpx.post(url, json=body, timeout=120)
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
    response = httpx.post(url, json=body, timeout=60)
    assert response.status_code == 400
    assert response.json()["detail"]["field"].startswith("groups[0]")
    response = httpx.post(url, json={"groups": "none"}, timeout=60)
    assert response.status_code == 422
