"""Ray Serve front end: statevalue replicas inside a Ray cluster.

Ray-based trainers (verl, OpenRLHF) can run the service as a Serve application in their
own cluster (``serve deploy deploy/ray/serve.yaml``) instead of beside it. Each replica
holds one model and one scheduler, exactly as ``statevalue serve`` does, so concurrent
calls from many trainer workers still merge into shared forward batches. Trainers call the
deployment handle with the HTTP API's JSON body::

    handle = serve.get_app_handle("statevalue")
    answer = handle.estimate.remote({"methods": ["hista"], "groups": [...]}).result()

and the Serve proxy answers the same body over HTTP at the application's route prefix.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from statevalue.api_models import EstimateIn, EstimateOut
from statevalue.metrics import Metrics
from statevalue.scheduler import QueueFull
from statevalue.schema import InvalidRequest
from statevalue.server import open_scheduler
from statevalue.settings import ServerSettings


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
    health_check_timeout_s=30,
    max_ongoing_requests=256,
)
class StatevalueDeployment:
    """One replica: the model, its engine and a scheduler, built from server settings.

    Args:
        settings: :class:`ServerSettings` fields (``model``, ``device``, batching limits,
            ...); ``STATEVALUE_*`` variables of the replica's environment fill the rest.
            Host and ports are unused: Ray routes the calls.
    """

    async def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = ServerSettings(**(settings or {}))
        self.scheduler = await open_scheduler(self.settings, Metrics())

    async def estimate(self, body: dict[str, Any]) -> dict[str, Any]:
        """The answer of ``POST /v1/estimate`` for its JSON ``body``.

        Raises:
            pydantic.ValidationError, InvalidRequest, QueueFull: as the HTTP API's 422,
                400 and 429.
        """
        request = EstimateIn.model_validate(body).to_request()
        result = await self.scheduler.submit(request)
        return EstimateOut.from_result(result).model_dump(mode="json", exclude_none=True)

    async def __call__(self, request: Request) -> JSONResponse:
        """HTTP through the Serve proxy: POST an estimate body to the route prefix."""
        try:
            return JSONResponse(await self.estimate(await request.json()))
        except ValidationError as exc:
            return JSONResponse({"detail": exc.errors(include_url=False)}, status_code=422)
        except InvalidRequest as exc:
            detail = {"field": exc.field, "message": exc.message}
            return JSONResponse({"detail": detail}, status_code=400)
        except QueueFull as exc:
            return JSONResponse({"detail": {"message": str(exc)}}, status_code=429)

    def check_health(self) -> None:
        """Ray Serve's periodic check: a stuck batcher fails it, and Ray replaces the replica."""
        problem = self.scheduler.stalled(self.settings.liveness_stall_s)
        if problem:
            raise RuntimeError(problem)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` and Serve config files: ``args`` are settings."""
    return StatevalueDeployment.bind(dict(args))
