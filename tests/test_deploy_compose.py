"""deploy/compose.yaml: server, Prometheus, Grafana and Redis wired to each other, and a
dashboard that only queries metrics the server exports. (No Docker daemon runs here.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from statevalue.metrics import Metrics
from statevalue.settings import ServerSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def exported_series() -> set[str]:
    """Every series name the server's /metrics can show (histogram parts, counter totals)."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    return names


def test_services_and_their_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"statevalue", "redis", "prometheus", "grafana"}
    server = services["statevalue"]
    build = server["build"]
    assert (build["context"], build["target"]) == ("..", "cpu")
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS cpu$", dockerfile, re.MULTILINE)
    declared = set(re.findall(r"^ARG (\w+)", dockerfile, re.MULTILINE))
    assert set(build["args"]) <= declared
    # The image `make image` builds and smoke-tests (deploy/image/build.sh's tag).
    version = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["version"]
    assert server["image"] == f"statevalue:{version}-cpu"
    assert {"50051:50051", "8000:8000"} <= set(server["ports"])
    fields = {f"STATEVALUE_{name.upper()}" for name in ServerSettings.model_fields}
    assert set(server["environment"]) - {"STATEVALUE_NUMCA_STORE"} <= fields
    assert server["environment"]["STATEVALUE_NUMCA_STORE"].startswith("redis://redis:6379/")
    assert server["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in services["redis"]
    # Compose stops with SIGTERM, then waits this long: beyond the server's drain grace.
    grace = ServerSettings.model_fields["shutdown_grace_s"].default
    assert int(server["stop_grace_period"].removesuffix("s")) > grace
    assert set(compose["volumes"]) == {"redis-data"}


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) is missing"


def test_prometheus_scrapes_the_server(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in compose["services"]
    assert f"{port}:{port}" in compose["services"][host]["ports"]
    assert int(port) == ServerSettings.model_fields["http_port"].default


def test_grafana_provisions_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = bind_mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "statevalue.yaml").read_text())[
        "providers"
    ]
    dashboards = mounts[provider["options"]["path"]]
    dashboard = json.loads((dashboards / "statevalue.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "statevalue.json").read_text())
    exported = exported_series()
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used.update(re.findall(r"\bstatevalue_[a-z_]+", target["expr"]))
    assert used, "the dashboard queries nothing"
    assert used <= exported, f"not exported: {sorted(used - exported)}"
    # The autoscaler's metric is on the dashboard.
    assert "statevalue_queue_depth" in used
