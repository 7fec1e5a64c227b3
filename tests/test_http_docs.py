"""The HTTP API's own pages: offline Swagger UI / ReDoc and the /metrics content type."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from statevalue.http_server import create_app
from statevalue.metrics import Metrics

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


@pytest.fixture(scope="module")
def client() -> TestClient:
    # The pages under test never touch the server object, so no model is loaded.
    return TestClient(create_app(object(), Metrics(), max_body_bytes=1 << 20))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_everything_from_the_server(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    html = response.text
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", html)
    assert urls, "no asset references found"
    external = [u for u in urls if re.match(r"^(https?:)?//", u)]
    assert external == [], f"{page} loads from another host: {external}"
    assert "cdn" not in html.lower()
    for url in urls:
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert asset.content, url


def test_swagger_ui_bundle_is_the_real_script(client: TestClient) -> None:
    html = client.get("/docs").text
    (script,) = re.findall(r"""src=['"]([^'"]*swagger-ui-bundle\.js)['"]""", html)
    body = client.get(script).text
    assert len(body) > 100_000 and "SwaggerUIBundle" in body


def test_metrics_content_type_is_the_documented_one(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert f"`{content_type}`" in API_DOC.read_text()
    assert "# TYPE statevalue_queue_depth gauge" in response.text
