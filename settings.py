"""Serving configuration in one typed place, read from `PNEUMONIA_*` environment variables.

Nested fields use a double underscore, e.g. `PNEUMONIA_BATCHING__MAX_BATCH_SIZE=16`
or `PNEUMONIA_LIMITS__MAX_PIXELS=40000000`. A JSON file named by
`PNEUMONIA_SETTINGS_FILE` is read first; environment variables override it.
Invalid values stop the server at start-up with a message naming the field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from training.preprocess import InputLimits


class BatchingSettings(BaseModel):
    """BentoML adaptive batching bounds for `classify` (images per forward pass, wait budget)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: every request runs its own forward pass (for comparisons)")
    max_batch_size: int = Field(32, ge=2, le=512, description="most images in one forward pass")
    max_latency_ms: int = Field(
        10_000, ge=10, description="latency bound of the dispatcher; requests that cannot meet it get 503"
    )


class GrpcSettings(BaseModel):
    """The gRPC endpoint (serving/grpc_endpoint.py), started inside every worker by `bentoml serve`."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="false: HTTP only")
    host: str = Field("0.0.0.0", description="interface to bind; the HTTP --host does not apply to gRPC")
    port: int = Field(3001, ge=1, le=65535, description="shared by all workers (SO_REUSEPORT)")
    shutdown_grace_s: float = Field(5.0, ge=0, description="time in-flight calls get to finish on shutdown")


class ServingSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMONIA_", env_nested_delimiter="__", extra="forbid")

    model: str = Field("production", description="'production' (resolved at start-up), a version or a full tag")
    workers: int = Field(1, ge=1, le=64, description="server processes, each with its own copy of the model")
    torch_threads: int = Field(0, ge=0, description="intra-op threads per worker; 0 = cores / workers")
    max_images_per_request: int = Field(16, ge=1, le=256)
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest accepted request body")
    timeout_s: int = Field(60, ge=1, description="request timeout")
    max_concurrency: int = Field(256, ge=1, description="requests in flight before 503")
    ready_wait_s: float = Field(
        5.0, ge=0, le=60, description="how long a classify call waits for a worker still warming up before its 503"
    )
    warmup_delay_s: float = Field(
        0.0, ge=0, le=600, description="TEST/OPS KNOB, keep 0: extra seconds before each worker loads its model"
    )
    limits: InputLimits = InputLimits()
    batching: BatchingSettings = BatchingSettings()
    grpc: GrpcSettings = GrpcSettings()

    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) // self.workers)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _JsonFileSource(settings_cls))


class _JsonFileSource(PydanticBaseSettingsSource):
    """Values from the JSON file named by PNEUMONIA_SETTINGS_FILE (lowest priority)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("PNEUMONIA_SETTINGS_FILE")
        if not path:
            return {}
        return json.loads(Path(path).read_text())
