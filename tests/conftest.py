"""Shared fixtures: the real embedded model, loaded once per test session."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from statevalue.backends.embedded import export_embedded_checkpoint
from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from statevalue.schema import GroupInput, RolloutInput
from tests.servers import RedisServer, Serve, start_serve_process

APPLES = "Tom has 5 apples and buys 3 more. How many apples does he have now?"


@pytest.fixture(scope="session")
def backend() -> TorchBackend:
    return TorchBackend("embedded", device="cpu")


def redis_or_skip(directory: Path) -> RedisServer:
    """A started real Redis (CI installs it; elsewhere the test skips without one)."""
    if shutil.which("redis-server") is None and not os.environ.get("CI"):
        pytest.skip("redis-server is not installed (make install-dev installs it)")
    directory.mkdir()
    return RedisServer(directory).start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh Redis for one test."""
    server = redis_or_skip(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def module_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for a test module's servers."""
    server = redis_or_skip(tmp_path_factory.mktemp("module") / "redis")
    yield server
    server.kill()


@pytest.fixture
def start_serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """Starts ``statevalue serve`` subprocesses (see ``start_serve_process``); kills leftovers."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        *flags: str, env: dict[str, str] | None = None, ports: tuple[int, int] | None = None
    ) -> Serve:
        log = tmp_path / f"serve-{len(processes)}.log"
        serve = start_serve_process(log, *flags, env=env, ports=ports)
        processes.append(serve[0])
        return serve

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=60)


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model as a plain float32 safetensors checkpoint directory."""
    return export_embedded_checkpoint(tmp_path_factory.mktemp("checkpoint") / "smollm2")


@pytest.fixture(scope="session")
def engine(backend: TorchBackend) -> Engine:
    return Engine(backend)


def last_number_reward(text: str, answer: int) -> float:
    numbers = re.findall(r"\d+", text)
    return float(bool(numbers) and int(numbers[-1]) == answer)


@pytest.fixture(scope="session")
def sampled_group(backend: TorchBackend, engine: Engine) -> GroupInput:
    """8 real responses (<= 100 tokens) of the embedded model with mixed 0/1 rewards."""
    prompt = engine.token_text.encode_chat([{"role": "user", "content": APPLES}])
    for seed in range(5):
        responses = backend.generate(prompt, 8, max_new_tokens=100, seed=seed)
        rewards = [
            last_number_reward(engine.token_text.decode_with_offsets(r)[0], 8) for r in responses
        ]
        if 0 < sum(rewards) < len(rewards):
            break
    assert 0 < sum(rewards) < len(rewards), "could not sample a group with mixed rewards"
    return GroupInput(
        group_id="apples",
        prompt_ids=prompt,
        rollouts=[
            RolloutInput(response_ids=r, reward=w) for r, w in zip(responses, rewards, strict=True)
        ],
    )


def as_ids(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
