"""Server settings: one typed object from environment variables (STATEVALUE_*) and CLI flags."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from typing_extensions import Self


class ServerSettings(BaseSettings):
    """Everything ``statevalue serve`` can be told. Env: ``STATEVALUE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="STATEVALUE_", extra="forbid", frozen=True)

    model: str = Field("embedded", description="'embedded', a local model directory or .gguf file")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: str = Field(
        "auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"
    )
    layer: int = Field(-1, description="hidden-state layer for Hista (-1 = last)")

    host: str = Field("127.0.0.1", description="address both front ends bind to")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = any free port)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")

    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward batch")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests")
    max_queue_requests: int = Field(
        256, ge=1, description="queued requests before 429 / RESOURCE_EXHAUSTED"
    )
    max_queue_tokens: int = Field(
        1_000_000, ge=1, description="queued tokens before 429 / RESOURCE_EXHAUSTED"
    )
    max_groups_per_request: int = Field(1024, ge=1, description="groups in one request")
    max_request_tokens: int = Field(
        65_536,
        ge=1,
        description="prompt+response tokens in one request (larger steps are split by the "
        "client); at most max_queue_tokens",
    )
    max_message_mb: int = Field(256, ge=1, description="gRPC and HTTP request size limit (MiB)")
    max_connection_age_s: float = Field(
        300.0, gt=0, description="gRPC connections close after this so clients re-resolve replicas"
    )
    numca_max_prompts: int = Field(100_000, ge=1, description="prompt tables kept for Numca (LRU)")
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="time to drain in-flight work on SIGTERM"
    )
    warmup: bool = Field(True, description="run one forward pass before reporting ready")
    log_json: bool = Field(False, description="structured JSON log lines")
    admin_token: str | None = Field(
        None, description="bearer token that allows weight reloads (unset: reloads disabled)"
    )

    @model_validator(mode="after")
    def _request_fits_the_queue(self) -> Self:
        # A request over the queue limit could never be admitted.
        if self.max_request_tokens > self.max_queue_tokens:
            raise ValueError(
                f"max_request_tokens ({self.max_request_tokens}) must not exceed "
                f"max_queue_tokens ({self.max_queue_tokens})"
            )
        return self
