"""/livez: alive while the batcher makes progress, 503 while a forward step hangs or it died."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from statevalue.backends.torch_backend import TorchBackend
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import ServerThread, hold_model, running_server, wait_for

GROUP = Group(prompt_ids=[1, 2, 3], rollouts=[Rollout([4, 5, 6], 1.0), Rollout([7, 8], 0.0)])


def livez(server: ServerThread) -> httpx.Response:
    return httpx.get(f"{server.http_url}/livez", timeout=10)


def test_livez_fails_while_a_forward_step_hangs_and_recovers(backend: TorchBackend) -> None:
    with running_server(backend, liveness_stall_s=0.3) as server:
        assert livez(server).status_code == 200
        with ValueClient(server.grpc_target) as client, ThreadPoolExecutor(1) as pool:
            with hold_model(backend):
                answer = pool.submit(client.estimate, [GROUP], ["hista"])
                wait_for(lambda: livez(server).status_code == 503, 30, "/livez to fail")
                detail = livez(server).json()["detail"]["message"]
                assert "forward step" in detail
                # /healthz only says the process answers; it cannot see the hang.
                assert httpx.get(f"{server.http_url}/healthz", timeout=10).status_code == 200
            assert len(answer.result(60).groups[0].rollouts) == 2
        assert livez(server).status_code == 200


def test_livez_fails_when_the_batcher_died(backend: TorchBackend) -> None:
    with running_server(backend) as server:
        scheduler = server.server.scheduler
        assert scheduler is not None and livez(server).status_code == 200

        async def kill_batcher() -> None:
            assert scheduler._batcher is not None
            scheduler._batcher.cancel()

        server.run(kill_batcher())
        wait_for(lambda: livez(server).status_code == 503, 10, "/livez to fail")
        assert livez(server).json()["detail"]["message"] == "the batcher stopped"


def test_livez_is_alive_while_the_model_loads(backend: TorchBackend) -> None:
    server = ServerThread(backend, warmup=True)
    try:
        with hold_model(backend):
            server.start(wait_ready=False)
            assert httpx.get(f"{server.http_url}/readyz", timeout=10).status_code == 503
            assert livez(server).status_code == 200
        server.wait_ready()
    finally:
        server.stop(grace=5.0)
