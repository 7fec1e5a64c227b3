"""Shared fixtures: the real embedded model, loaded once per test session.

The model is the embedded SmolLM2-135M exported once per machine to a plain safetensors
checkpoint (``cached_embedded_checkpoint``), which loads in a fraction of a second where
the GGUF file takes many seconds of de-quantisation; tests/test_cli.py keeps the default
(GGUF) path covered and checks that both give the same values.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch

from statevalue.backends.embedded import cached_embedded_checkpoint
from statevalue.backends.torch_backend import TorchBackend
from statevalue.engine import Engine
from statevalue.schema import GroupInput, RolloutInput
from tests.servers import RedisServer, Serve, start_serve_process

# Modules whose tests wait on deadlines, grace periods or queue bounds, and the ones that
# load the machine on purpose: under pytest-xdist (`make test` runs two workers) they run
# on one worker, one after another.
TIMING_GROUP = "timing"
TIMING_MODULES = {
    "test_bench_perf",
    "test_bench_step",
    "test_deadlines",
    "test_liveness",
    "test_load_scenarios",
    "test_server_drain",
    "test_server_overload",
    "test_server_sigterm",
}

APPLES = "Tom has 5 apples and buys 3 more. How many apples does he have now?"
ANSWER = 8
MAX_NEW_TOKENS = 100
SAMPLED_GROUP = Path(__file__).parent / "data" / "sampled_group.json"


def pytest_configure(config: pytest.Config) -> None:
    """Under xdist, split the cores between the workers (and the servers they start)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under xdist, each test module runs on one worker (its module-scoped servers start
    once) and the timing-sensitive modules run on one worker, one after another."""
    from xdist.scheduler import LoadFileScheduling

    class ModuleScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return TIMING_GROUP if Path(path).stem in TIMING_MODULES else path

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def embedded_checkpoint() -> Path:
    """The embedded model as a plain float32 safetensors checkpoint directory (read only:
    it is shared by every test session of the machine)."""
    return cached_embedded_checkpoint()


@pytest.fixture(scope="session")
def backend(embedded_checkpoint: Path) -> TorchBackend:
    return TorchBackend(str(embedded_checkpoint), device="cpu")


def import_or_skip(module: str) -> ModuleType:
    """``pytest.importorskip``, except in CI (``CI`` set), where every optional stack is
    installed (`make test`) and a missing one must fail the run, not skip silently."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


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
def start_serve(tmp_path: Path, embedded_checkpoint: Path) -> Iterator[Callable[..., Serve]]:
    """Starts ``statevalue serve`` subprocesses (see ``start_serve_process``) on the exported
    checkpoint (a ``--model`` flag overrides it); kills leftovers."""
    processes: list[subprocess.Popen[str]] = []

    def start(
        *flags: str, env: dict[str, str] | None = None, ports: tuple[int, int] | None = None
    ) -> Serve:
        log = tmp_path / f"serve-{len(processes)}.log"
        model = ("--model", str(embedded_checkpoint))
        serve = start_serve_process(log, *model, *flags, env=env, ports=ports)
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
def engine(backend: TorchBackend) -> Engine:
    return Engine(backend)


def last_number_reward(text: str, answer: int) -> float:
    numbers = re.findall(r"\d+", text)
    return float(bool(numbers) and int(numbers[-1]) == answer)


@pytest.fixture(scope="session")
def sampled_group() -> GroupInput:
    """8 real responses (<= 100 tokens) of the embedded model with mixed 0/1 rewards, as
    committed (tests/data/generate_sampled_group.py wrote them)."""
    data = json.loads(SAMPLED_GROUP.read_text())
    return GroupInput(
        group_id="apples",
        prompt_ids=as_ids(data["prompt_ids"]),
        rollouts=[
            RolloutInput(response_ids=as_ids(r["response_ids"]), reward=r["reward"])
            for r in data["rollouts"]
        ],
    )


def as_ids(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)
