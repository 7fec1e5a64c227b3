"""Ray Serve front end: statevalue replicas inside a Ray cluster.

Ray-based trainers (verl, OpenRLHF) can run the service as a Serve application in their
own cluster (``serve deploy deploy/ray/serve.yaml``) instead of beside it. Each replica is
a :class:`StatevalueServer` without ports of its own: one model, one scheduler (concurrent
calls from many trainer workers still merge into shared forward batches), and the server's
own estimate path, so the API token, the error table of ``errors.py`` (Retry-After
included) and the metrics are those of ``statevalue serve``. The Serve proxy answers the
HTTP API under the application's route prefix (``POST /statevalue/v1/estimate``,
``GET /statevalue/v1/model``, ``/statevalue/metrics``, ...); trainers in the cluster call
the deployment handle with the same JSON body::

    handle = serve.get_app_handle("statevalue")
    answer = handle.estimate.remote(body, authorization="Bearer <token>").result()
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from starlette.types import ASGIApp

from statevalue.api_models import EstimateIn, EstimateOut
from statevalue.errors import error_reply
from statevalue.server import StatevalueServer
from statevalue.settings import ServerSettings


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    max_ongoing_requests=256,
)
@serve.ingress()
class StatevalueDeployment:
    """One replica: a statevalue server over one model, built from server settings.

    Args:
        settings: :class:`ServerSettings` fields (``model``, ``device``, batching limits,
            ``api_token``, ...); ``STATEVALUE_*`` variables of the replica's environment fill
            the rest. Host, ports and TLS are unused: Ray's proxy listens.
    """

    async def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = ServerSettings(**(settings or {}))
        self.server = StatevalueServer(self.settings)
        await self.server.load()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The HTTP API of ``statevalue serve``, for Ray's proxy to serve."""
        return self.server.app

    async def estimate(
        self, body: dict[str, Any], authorization: str | None = None
    ) -> dict[str, Any]:
        """The answer of ``POST /v1/estimate`` for its JSON ``body``.

        Args:
            body: the JSON body of ``POST /v1/estimate``.
            authorization: ``"Bearer <api token>"`` when the server requires one.

        Raises:
            pydantic.ValidationError (the HTTP API's 422), or a refusal of the server's
            estimate path (errors.py maps each to its HTTP status and gRPC code).
        """
        request = EstimateIn.model_validate(body).to_request()
        status = 200
        try:
            result = await self.server.estimate(request, authorization, None)
        except Exception as exc:
            reply = error_reply(exc)
            status = 500 if reply is None else reply.http_status
            raise
        finally:
            self.server.metrics.requests.labels("ray", "estimate", str(status)).inc()
        return EstimateOut.from_result(result).model_dump(mode="json", exclude_none=True)

    def check_health(self) -> None:
        """Ray Serve's periodic check: a stuck batcher fails it, and Ray replaces the replica."""
        scheduler = self.server.scheduler
        problem = scheduler and scheduler.stalled(self.settings.liveness_stall_s)
        if problem:
            raise RuntimeError(problem)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` and Serve config files: ``args`` are settings."""
    return StatevalueDeployment.bind(dict(args))
