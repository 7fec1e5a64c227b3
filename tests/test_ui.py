"""The debug page at /ui: shipped inside the package, served offline, and working in a real
browser (headless Chromium) against a real server."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomllib
from fastapi.testclient import TestClient

from statevalue.backends.torch_backend import TorchBackend
from statevalue.http_server import create_app
from statevalue.metrics import Metrics
from tests.conftest import APPLES
from tests.servers import running_server

ROOT = Path(__file__).resolve().parents[1]
UI_FILES = {"index.html", "ui.css", "ui.js"}
SCREENSHOT = ROOT / "docs" / "ui.png"


def test_the_page_is_package_data() -> None:
    shipped = importlib.resources.files("statevalue") / "ui"
    assert {p.name for p in shipped.iterdir()} == UI_FILES
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]
    assert "ui/*" in package_data["statevalue"]


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Serving the page never touches the server object, so no model is loaded.
    return TestClient(create_app(object(), Metrics(), max_body_bytes=1 << 20))


def test_ui_is_served_with_its_assets_and_nothing_remote(client: TestClient) -> None:
    redirect = client.get("/ui", follow_redirects=False)
    assert redirect.status_code in (301, 302, 307)
    assert redirect.headers["location"] == "ui/"
    page = client.get("/ui/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert sorted(assets) == ["ui.css", "ui.js"]
    for asset in assets:
        response = client.get(f"/ui/{asset}")
        assert response.status_code == 200 and response.content, asset
    script = client.get("/ui/ui.js").text
    for text in (html, script, client.get("/ui/ui.css").text):
        # Only the SVG namespace name, which is no request.
        remote = set(re.findall(r"https?://[^\s\"'`)]+", text)) - {"http://www.w3.org/2000/svg"}
        assert remote == set()
    # The page talks to the public API only, through one fetch.
    assert script.count("fetch(") == 1
    assert set(re.findall(r"""api\(["`](v1/[a-z/]+)""", script)) == {
        "v1/model",
        "v1/estimate",
        "v1/debug/history",
        "v1/debug/history/",
    }
    assert "/ui" not in client.get("/openapi.json").text


# -- headless Chromium ----------------------------------------------------------------


def readme_example() -> dict[str, Any]:
    """The JSON of the README's curl example."""
    (example,) = re.findall(r"-d '(\{.*?\})'", (ROOT / "README.md").read_text(), re.S)
    return json.loads(example)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """A headless Chromium through Debian's chromedriver; never a downloaded driver."""
    browser = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        browser = None
    if browser is None or driver_path is None:
        reason = "chromium, chromium-driver or selenium missing (make install-dev installs them)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(condition: Any, timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_debug_page_in_chromium(backend: TorchBackend, chromium: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = chromium

    def find(selector: str) -> Any:
        return driver.find_element(By.CSS_SELECTOR, selector)

    def tokens() -> list[Any]:
        return driver.find_elements(By.CSS_SELECTOR, ".token")

    def token(rollout: int, text: str) -> Any:
        """The first token of ``rollout`` whose text is ``text``."""
        return next(
            span
            for span in driver.find_elements(By.CSS_SELECTOR, f".token[data-r='{rollout}']")
            if span.get_attribute("textContent") == text
        )

    def status() -> str:
        return find("#status").text

    def estimate() -> list[Any]:
        find("#run").click()
        wait_until(lambda: status().startswith(("done", "4", "5")), what="the estimate")
        assert status().startswith("done"), status()
        return tokens()

    def hover(token: Any) -> str:
        ActionChains(driver).move_to_element(token).perform()
        tip = find("#tooltip")
        wait_until(tip.is_displayed, 10, "the tooltip")
        return tip.text

    def choose(name: str, value: str) -> None:
        find(f"input[name={name}][value={value}]").click()

    with running_server(backend, debug_history=4) as server:
        driver.get(f"{server.http_url}/ui")
        model = wait_until(lambda: "revision" in find("#model").text and find("#model").text)
        assert backend.identity.name in model and backend.identity.version in model

        # The README's example, pasted.
        example = readme_example()
        find("#request").send_keys(json.dumps(example, indent=1))
        spans = estimate()
        # One span per response token.
        assert len(spans) == sum(len(r["response_ids"]) for r in example["groups"][0]["rollouts"])
        assert "answered by" in find(".answered").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "svg.plot")) == 2
        choose("colour", "advantage")
        colours = [t.value_of_css_property("background-color") for t in tokens()]
        assert all(c.startswith("rgb") and c != "rgba(0, 0, 0, 0)" for c in colours)
        # Rewards 1 and 0: positive advantages on one side of the scale, negative on the other
        # (the first token is the first rollout's, the last the second's).
        assert colours[0] != colours[-1]
        choose("method", "hista")
        first = tokens()[0]
        assert float(first.get_attribute("data-value")) == pytest.approx(0.5)
        text = hover(first)
        assert "token 0" in text and "value 0.5000" in text and "advantage" in text
        assert "before the first node" in text
        choose("method", "numca")
        assert "state ∅" in hover(tokens()[1])

        # Prompt and responses as text, with nodes close enough to have neighbours.
        find("#input details:nth-of-type(2) summary").click()
        find("#prompt-text").send_keys(APPLES)
        rows = driver.find_elements(By.CSS_SELECTOR, ".response-row")
        find("#add-response").click()
        rows = driver.find_elements(By.CSS_SELECTOR, ".response-row")
        for row, (response, reward) in zip(
            rows,
            [
                ("He has 5 apples, buys 3 more: 5 + 3 = 8. The answer is 8.", "1"),
                ("He has 5 apples and gives 3 away: 5 - 3 = 2. The answer is 2.", "0"),
                ("5 + 3 = 8 apples. So Tom has 8 apples now.", "1"),
            ],
            strict=True,
        ):
            row.find_element(By.TAG_NAME, "textarea").send_keys(response)
            row.find_element(By.TAG_NAME, "input").send_keys(reward)
        find("#text-params").send_keys(
            '{"hista": {"node_spacing": 6}, "numca": {"merge_distance": 4}}'
        )
        find("#use-text").click()
        wait_until(lambda: status().startswith(("done", "4", "5")), what="the text estimate")
        assert status().startswith("done"), status()
        assert "apples" in find(".tokens").text
        choose("method", "numca")
        assert "state {5}" in hover(token(0, " apples"))
        choose("method", "hista")
        choose("colour", "value")
        for summary in driver.find_elements(By.CSS_SELECTOR, "#input details[open] summary"):
            summary.click()  # fold the inputs away: the screenshot shows the answer
        text = hover(token(0, " answer"))
        assert "node at token" in text and "weight" in text and "distance" in text
        assert driver.find_elements(By.CSS_SELECTOR, ".token.neighbour")
        screenshot = (
            SCREENSHOT if os.environ.get("STATEVALUE_UPDATE_SCREENSHOT") else tmp_path / "ui.png"
        )
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000

        # The requests the page sent were kept; the history panel shows them.
        find("#history-panel summary").click()
        find("#history-refresh").click()
        wait_until(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#history option")) == 2)
        find("#history-load").click()
        wait_until(lambda: status().startswith("request #"), what="the kept request")
        assert "apples" in find(".tokens").text
