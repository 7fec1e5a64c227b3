"""Server settings: one typed object from environment variables (STATEVALUE_*) and CLI flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from typing_extensions import Self

from statevalue.config import load_params
from statevalue.numca_store import redacted

_SECRETS = ("admin_token", "api_token")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ModelSettings(BaseSettings):
    """Which model to load and how: what every command that loads one is told.

    Env: ``STATEVALUE_<FIELD>``.
    """

    model_config = SettingsConfigDict(env_prefix="STATEVALUE_", extra="forbid", frozen=True)

    # Before `model`, whose check depends on it.
    backend: Literal["torch", "vllm", "none"] = Field(
        "torch",
        description="what runs the model: torch (transformers, in this process), vllm "
        "(vLLM's pooling runner; needs the vllm extra, last layer only) or none (only the "
        "model's tokenizer: Hista from representations the trainer sends)",
    )
    model: str = Field(
        "embedded",
        description="'embedded', a local Hugging Face model directory (with a config.json) "
        "or a .gguf file",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16"
    )
    layer: int = Field(-1, description="hidden-state layer for Hista (-1 = last)")
    forward_path: Literal["auto", "padded", "packed", "prompt_once"] = Field(
        "auto",
        description="how a forward batch is laid out: padded, packed (unpadded rows, block "
        "mask) or prompt_once (each group's prompt once, its KV cache reused); auto = padded "
        "on torch, prompt_once (through the prefix cache) on vllm, which cannot pad",
    )
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per forward batch")
    vllm_memory_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description="vllm: share of GPU memory (of RAM on a CPU) for weights and KV cache "
        "(unset: 0.85 on CUDA, 0.15 on a CPU)",
    )
    vllm_enforce_eager: bool | None = Field(
        None,
        description="vllm: no torch.compile or CUDA graphs (unset: eager on a CPU, where "
        "compiling takes minutes; compiled on CUDA)",
    )

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str, info: ValidationInfo) -> str:
        # A wrong path stops the start in one line, before a port opens or the model loads.
        # Imported here: the backends bring torch, which `serve --help` does not need.
        from statevalue.backends.location import locate_model

        locate_model(value, info.data.get("backend", "torch"))
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {value!r}")
        return value


class ServerSettings(ModelSettings):
    """Everything ``statevalue serve`` can be told. Env: ``STATEVALUE_<FIELD>``."""

    params_file: Path | None = Field(
        None,
        description="JSON of estimator parameters (as written by 'statevalue calibrate "
        "--out'): the defaults of every request, which may still set any field itself",
    )
    host: str = Field("127.0.0.1", description="address both front ends bind to")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = any free port)")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = any free port)")

    micro_batch_seconds: float = Field(
        1.0,
        gt=0,
        description="model time one forward micro-batch aims at (its tokens come from the "
        "measured speed, at most max_batch_tokens): how soon a cancel, a deadline or a "
        "drain stops work",
    )
    max_wait_ms: float = Field(5.0, ge=0, description="how long a batch waits for more requests")
    max_queue_requests: int = Field(
        256, ge=1, description="queued requests before 429 / RESOURCE_EXHAUSTED"
    )
    max_queue_tokens: int = Field(
        1_000_000, ge=1, description="queued tokens before 429 / RESOURCE_EXHAUSTED"
    )
    max_queue_wait_s: float = Field(
        20.0,
        gt=0,
        description="refuse (429 / RESOURCE_EXHAUSTED) a request whose estimated wait behind "
        "the queued work, at the measured throughput, is longer than this",
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
    numca_store: str = Field(
        "memory",
        description="where Numca's per-prompt tables live: 'memory' (this process) or "
        "redis://[:password@]host:port/db (shared by every replica, durable as Redis is)",
    )
    numca_max_prompts: int = Field(
        100_000, ge=1, description="prompt tables kept for Numca (least recently used dropped)"
    )
    numca_ttl_s: float = Field(
        0.0, ge=0, description="drop a prompt's Numca table unused this long (0 = never)"
    )
    numca_snapshot: Path | None = Field(
        None,
        description="memory store: save the tables to this file when the server stops and "
        "load them when it starts",
    )
    shutdown_grace_s: float = Field(
        30.0,
        ge=0,
        description="SIGTERM: time to drain accepted work; what is left then gets 503 / "
        "UNAVAILABLE",
    )
    liveness_stall_s: float = Field(
        120.0, gt=0, description="/livez fails once one forward step has run this long"
    )
    warmup: bool = Field(True, description="run one forward pass before reporting ready")
    log_json: bool = Field(False, description="structured JSON log lines")
    debug_history: int = Field(
        0,
        ge=0,
        description="keep the last N Estimate requests with their answers and explanations "
        "for the debug page /ui (0 = off; with an API token, only its holders see them)",
    )
    admin_token: SecretStr | None = Field(
        None,
        description="bearer token that allows weight reloads (unset: reloads disabled); "
        "prefer --admin-token-file or the environment, which ps does not show",
    )
    admin_token_file: Path | None = Field(None, description="file holding the admin token")
    api_token: SecretStr | None = Field(
        None, description="bearer token every Estimate must carry (unset: no authentication)"
    )
    api_token_file: Path | None = Field(None, description="file holding the API token")
    tls_cert: Path | None = Field(
        None, description="PEM certificate chain: serve TLS on both ports"
    )
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mTLS)"
    )

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, data: Any) -> Any:
        # A token read from a file never appears on a command line.
        if not isinstance(data, dict):
            return data
        for name in _SECRETS:
            path = data.get(f"{name}_file")
            if path:
                if data.get(name):
                    raise ValueError(f"give {name} or {name}_file, not both")
                data = {**data, name: Path(path).read_text().strip()}
        return data

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        for name in _SECRETS:
            secret = getattr(self, name)
            if secret is not None and not secret.get_secret_value():
                raise ValueError(f"{name} is empty")
        return self

    @field_validator("numca_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must be 'memory' or a redis:// URL, not {redacted(value)!r}")
        return value

    @field_validator("params_file")
    @classmethod
    def _params_load(cls, value: Path | None) -> Path | None:
        # A bad file stops the start, naming the file and the field, before the model loads.
        if value is not None:
            load_params(value)
        return value

    @field_serializer("numca_store")
    def _without_password(self, value: str) -> str:
        # Settings are logged at start; a Redis password must not be.
        return redacted(value)

    @model_validator(mode="after")
    def _snapshot_needs_memory(self) -> Self:
        if self.numca_snapshot is not None and self.numca_store != "memory":
            raise ValueError("numca_snapshot is for the memory store; Redis persists itself")
        return self

    @model_validator(mode="after")
    def _request_fits_the_queue(self) -> Self:
        # A request over the queue limit could never be admitted.
        if self.max_request_tokens > self.max_queue_tokens:
            raise ValueError(
                f"max_request_tokens ({self.max_request_tokens}) must not exceed "
                f"max_queue_tokens ({self.max_queue_tokens})"
            )
        return self

    def secret(self, name: str) -> str | None:
        """The plain value of the ``admin_token`` or ``api_token`` setting."""
        value: SecretStr | None = getattr(self, name)
        return None if value is None else value.get_secret_value()
