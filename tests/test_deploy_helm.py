"""deploy/helm/statevalue: rendered by Helm's own engine, linted, checked against the
Kubernetes 1.37 schemas, and consistent with what the server really serves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml

from tests.conftest import import_or_skip

helm = import_or_skip("helm_python")
kubernetes_validate = import_or_skip("kubernetes_validate")

from statevalue.http_server import create_app  # noqa: E402
from statevalue.metrics import Metrics  # noqa: E402
from statevalue.settings import ServerSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "statevalue"
KUBERNETES = "1.37.0"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values or {}, name="sv", namespace="rl")
    return [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def server_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sv-statevalue"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


ALL_ON = {"serviceMonitor": {"enabled": True}, "redis": {"enabled": True}}
CPU = {
    "image": {"repository": "statevalue", "tag": "0.1.0-cpu"},
    "device": "cpu",
    "gpus": 0,
    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
    "tolerations": [],
    "autoscaling": {"enabled": False},
    "model": {"path": "/models/smol.gguf", "volume": {"hostPath": {"path": "/data/models"}}},
}


def test_chart_lints_clean() -> None:
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [{}, ALL_ON, CPU], ids=["default", "all-on", "cpu"])
def test_every_manifest_matches_the_kubernetes_schema(values: dict[str, Any]) -> None:
    docs = render(values)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            continue  # a Prometheus Operator CRD, not in the Kubernetes schemas; checked below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_default_release_runs_gpu_replicas_on_a_mounted_model() -> None:
    docs = render()
    kinds = by_kind(docs)
    expected = ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    assert sorted(kinds) == expected
    container = server_container(docs)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": 1}
    variables = env(container)
    assert variables["STATEVALUE_DEVICE"] == "cuda"
    (mount,) = container["volumeMounts"]
    assert mount["readOnly"] and variables["STATEVALUE_MODEL"].startswith(mount["mountPath"] + "/")
    (volume,) = kinds["Deployment"][0]["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"] and "persistentVolumeClaim" in volume
    # Every variable the chart sets is a real server setting (no silently ignored names).
    fields = {f"STATEVALUE_{name.upper()}" for name in ServerSettings.model_fields}
    assert set(variables) <= fields
    # The HPA owns the replica count.
    assert "replicas" not in kinds["Deployment"][0]["spec"]
    (service,) = kinds["Service"]
    assert service["spec"]["clusterIP"] == "None"


def test_default_image_is_the_one_make_image_cuda_builds() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    # deploy/image/build.sh tags statevalue:<version>-<target> (make image, make image-cuda).
    assert "image=statevalue:$version-$target" in (ROOT / "deploy/image/build.sh").read_text()
    assert server_container(render())["image"] == f"statevalue:{version}-cuda"
    assert server_container(render(CPU))["image"] == f"statevalue:{version}-cpu"


def test_probes_hit_endpoints_that_exist_and_can_fail() -> None:
    container = server_container(render())
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    variables = env(container)
    assert ports["grpc"] == int(variables["STATEVALUE_GRPC_PORT"])
    assert ports["http"] == int(variables["STATEVALUE_HTTP_PORT"])
    # Readiness: the standard gRPC health service on the gRPC port.
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    app = create_app(object(), Metrics(), max_body_bytes=1 << 20)
    routes = {route.path for route in app.routes}
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    # /healthz cannot fail; liveness must use /livez, which reports a stuck batcher.
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"


def test_disruption_budget_and_autoscaler_on_queue_depth() -> None:
    kinds = by_kind(render())
    (pdb,) = kinds["PodDisruptionBudget"]
    selector = kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert pdb["spec"]["maxUnavailable"] == 1
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert name == "statevalue_queue_depth" and name in exported
    assert hpa["spec"]["scaleTargetRef"]["name"] == kinds["Deployment"][0]["metadata"]["name"]


def test_service_monitor_and_redis_when_enabled() -> None:
    docs = render(ALL_ON)
    kinds = by_kind(docs)
    (monitor,) = kinds["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint == {"port": "http", "path": "/metrics", "interval": "15s"}
    server_service = next(s for s in kinds["Service"] if s["metadata"]["name"] == "sv-statevalue")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        server_service["metadata"]["labels"].items()
    )
    redis_service = next(
        s for s in kinds["Service"] if s["metadata"]["name"] == "sv-statevalue-redis"
    )
    store = env(server_container(docs))["STATEVALUE_NUMCA_STORE"]
    assert store == f"redis://sv-statevalue-redis:{redis_service['spec']['ports'][0]['port']}/0"
    redis = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "sv-statevalue-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_labels.items()
    # The server's headless Service and PDB must not pick up the Redis pod.
    assert not server_service["spec"]["selector"].items() <= redis_labels.items()


def test_cpu_values_request_no_gpu_and_fixed_replicas() -> None:
    docs = render(CPU)
    container = server_container(docs)
    assert container["resources"] == CPU["resources"]
    (volume,) = by_kind(docs)["Deployment"][0]["spec"]["template"]["spec"]["volumes"]
    assert volume == {"name": "model", "hostPath": {"path": "/data/models"}}
    assert env(container)["STATEVALUE_DEVICE"] == "cpu"
    assert "HorizontalPodAutoscaler" not in by_kind(docs)
    assert by_kind(docs)["Deployment"][0]["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": "two"},
        {"device": "gpu"},
        {"model": {"path": "relative/dir"}},
        {"model": {"claimName": "", "volume": {}}},
        {"model": {"volume": {"emptyDir": {}, "hostPath": {"path": "/m"}}}},
        {"settings": {"max_wait_ms": "5"}},
        {"autoscaling": {"enabled": True, "targetQueueDepth": 0}},
        {"unknown": 1},
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(values)
