"""The shell commands in README.md and docs/*.md: each is run by a named test or CI step, or
marked as not run here with the reason, and the HTTP and client examples run here.

A fenced ``bash``/``sh``/``shell``/``console`` block is preceded by one marker line:

    <!-- doc-command: run by tests/test_x.py::test_y, .ci/run (a note) -->
    <!-- doc-command: not run here: why not -->

A marker names tests that exist (``path::function``) or ``.ci/run``; a block without one, or
naming a test that is gone, fails the check.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from statevalue.backends.torch_backend import TorchBackend
from tests.servers import ServerThread, running_server

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MARKER = re.compile(r"<!-- doc-command: (run by (?P<by>.+?)|not run here: (?P<why>.+?)) -->")


@dataclass(frozen=True)
class Block:
    """A fenced shell block of a doc, where it starts and the marker above it."""

    doc: Path
    line: int
    text: str
    marker: re.Match[str] | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def shell_blocks() -> list[Block]:
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for fence in FENCE.finditer(text):
            if fence.group(1) not in SHELL:
                continue
            before = text[: fence.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text[: fence.start()].count("\n") + 1
            blocks.append(Block(doc, line, fence.group(2), MARKER.fullmatch(before.strip())))
    return blocks


def commands_starting(prefix: str) -> list[Block]:
    """The blocks whose command starts with ``prefix``."""
    return [block for block in shell_blocks() if block.text.startswith(prefix)]


def test_every_documented_command_is_run_or_marked() -> None:
    blocks = shell_blocks()
    assert len(blocks) > 10, "the docs' shell blocks were not found"
    for block in blocks:
        assert block.marker, f"{block.where}: no doc-command marker above the block"
        if block.marker.group("why"):
            assert len(block.marker.group("why")) > 10, f"{block.where}: give the reason"
            continue
        for named in block.marker.group("by").split(", "):
            target = named.split(" (", 1)[0]  # a note in parentheses may follow
            if target == ".ci/run":
                assert (ROOT / ".ci" / "run").is_file()
                continue
            path, _, name = target.partition("::")
            assert name, f"{block.where}: {target!r} is not path::test"
            source = ROOT / path
            assert source.is_file(), f"{block.where}: {path} does not exist"
            assert re.search(rf"^def {re.escape(name)}\(", source.read_text(), re.M), (
                f"{block.where}: {target} does not exist"
            )


@pytest.fixture(scope="module")
def server(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend) as server:
        yield server


def run_bash(command: str) -> str:
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_documented_http_requests_answer(server: ServerThread) -> None:
    """Every documented ``curl`` request to the HTTP API, as written, on a real server."""
    blocks = commands_starting("curl -s localhost:8000/")
    assert len(blocks) >= 3
    for block in blocks:
        command = block.text.replace("localhost:8000", f"127.0.0.1:{server.server.http_port}")
        answer = json.loads(run_bash(command))
        assert answer["model"]["name"] == "SmolLM2-135M-Instruct", block.where
        assert answer["groups"] and all(g["rollouts"] for g in answer["groups"]), block.where


def test_readme_client_example_runs(server: ServerThread) -> None:
    """The README's Python client example, as written, with this environment's python."""
    (block,) = commands_starting(".venv/bin/python -c '")
    command = block.text.replace(".venv/bin/python", sys.executable).replace(
        "localhost:50051", server.grpc_target
    )
    name, version = run_bash(command).splitlines()[0].split()
    assert name == "SmolLM2-135M-Instruct" and version
