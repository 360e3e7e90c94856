"""Service settings: `LABELER_*` environment variables, overridden by `labeler serve` flags."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from labeler.chat import END_MARKERS
from labeler.spec import MAX_GROUP_SIZE
from labeler.tasks import split_dirs


def _split(value: Any) -> Any:
    """Comma-separated env values as lists (`LABELER_API_KEYS=k1,k2`)."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Everything the server can be told. Each field is also `LABELER_<NAME>`."""

    # Errors name the setting, never echo its value: a Redis URL or an API key holds a secret.
    model_config = SettingsConfigDict(env_prefix="LABELER_", extra="ignore", hide_input_in_errors=True)

    host: str = Field("127.0.0.1", description="bind address; the default keeps the server on loopback")
    port: int = Field(8000, ge=0, le=65535)
    # Model and engine.
    model: str | None = Field(None, description="'embedded' (default), a local HF directory or a .gguf file")
    engine: str = Field("transformers", description="transformers | vllm | vllm-remote")
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="KEY=VALUE engine options (space-separated in the env var)"
    )
    vllm_urls: Annotated[list[str], NoDecode] = Field(default_factory=list, description="for vllm-remote")
    device: str = Field("cpu", description="torch device of the transformers engine (cpu, cuda, cuda:1, ...)")
    tasks_dir: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="directories of extra task files (':'-separated in the env var, like PATH)"
    )
    task: str = Field("general", description="default task of /get_reward")
    max_rationale_tokens: int = Field(128, ge=1, le=4096, description="tokens of a chain-of-thought rationale")
    temperature: float = Field(0.7, gt=0, le=10, description="sampling temperature of self-consistency rationales")
    end_markers: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(END_MARKERS),
        description="end-of-turn markers stripped from responses and chat turns (comma-separated in the env var)",
    )
    # Cache.
    redis_url: str | None = Field(None, description="Redis URL; without one the cache is in-process")
    cache_ttl: int = Field(7 * 24 * 3600, ge=0, description="seconds a cached label lives (0: no expiry)")
    cache_size: int = Field(100_000, ge=0, description="entries of the in-process LRU cache")
    cache_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="bytes of results the in-process cache holds (their JSON size)"
    )
    redis_cooldown: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="seconds to bypass Redis after a connection error"
    )
    # Auth and limits.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_items: int = Field(256, ge=1, description="items per request")
    max_chars: int = Field(32_000, ge=1, description="characters per text field")
    max_item_tokens: int = Field(4096, ge=1, description="tokens per item (all its texts)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_samples: int = Field(8, ge=1, le=16)
    max_group_size: int = Field(
        MAX_GROUP_SIZE, ge=2, le=MAX_GROUP_SIZE, description="completions per group (a group of N is N (N - 1) reads)"
    )
    # Batching.
    max_queue_items: int = Field(4096, ge=1, description="items waiting or computing; beyond it: 429")
    batch_max_items: int = Field(64, ge=1, description="items per engine call")
    batch_wait_ms: float = Field(
        5.0, ge=0, allow_inf_nan=False, description="how long the batcher waits to fill a batch"
    )
    batch_concurrency: int = Field(0, ge=0, description="engine calls at once (0: 1 for transformers, 8 for vLLM)")
    # Checked here: logging.config refuses an unknown level only with a confusing traceback.
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @field_validator("engine_args", mode="before")
    @classmethod
    def _split_space(cls, value: Any) -> Any:
        return value.split() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Refused at start-up, not after the model has loaded (which can take minutes).
        if value:
            from redis.connection import parse_url

            parse_url(value)  # ValueError: the scheme, port or database it cannot read
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("tasks_dir", mode="before")
    @classmethod
    def _split_paths(cls, value: Any) -> Any:
        return split_dirs(value) if isinstance(value, str) else value

    @field_validator("vllm_urls", "api_keys", "cors_origins", "end_markers", mode="before")
    @classmethod
    def _split_comma(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("api_keys")
    @classmethod
    def _keys_a_header_carries(cls, keys: list[str]) -> list[str]:
        # Else a client could never send it: HTTP clients write headers in ASCII (Basic
        # credentials in Latin-1), so the server would refuse the key it was given.
        for k in keys:
            if not (k.isascii() and k.isprintable()):
                raise ValueError("an API key must be printable ASCII: HTTP clients put no other characters in headers")
        return keys

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        # Else a full request is refused with 429 however idle the server, and retried forever.
        if self.max_queue_items < self.max_items:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least max_items ({self.max_items}): "
                "a request of max_items new items could never be queued"
            )
        comparisons = self.max_group_size * (self.max_group_size - 1) // 2  # what a largest group counts
        if self.max_queue_items < comparisons:
            raise ValueError(
                f"max_queue_items ({self.max_queue_items}) must be at least the {comparisons} comparisons of a "
                f"group of max_group_size ({self.max_group_size}): such a group could never be queued"
            )
        return self

    def engine_options(self) -> dict[str, Any]:
        """The options `labeler.engines.load_engine` takes for these settings' engine."""
        from labeler.engines import engine_options

        return engine_options(self.engine, device=self.device, engine_args=self.engine_args, vllm_urls=self.vllm_urls)

    def effective_batch_concurrency(self) -> int:
        if self.batch_concurrency:
            return self.batch_concurrency
        return 1 if self.engine == "transformers" else 8


# The other `LABELER_*` variables of the product: the client's (URL, key), the model cache's
# directory and the compose files' (read by docker compose, not by the server).
OTHER_VARIABLES = frozenset(
    {
        "LABELER_URL",
        "LABELER_API_KEY",
        "LABELER_CACHE_DIR",
        "LABELER_PUBLISH",
        "LABELER_API_REPLICAS",
        "LABELER_API_THREADS",
        "LABELER_ENV_FILE",
        "LABELER_GPU_MODEL",
        "LABELER_GPU_ENGINE_ARGS",
        "LABELER_GPU_PUBLISH",
    }
)


def misspelled_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each `LABELER_*` variable that is no setting but nearly spells one
    (`LABELER_REDIS_ULR`): it is ignored, and the setting it meant keeps its default (an
    in-process cache instead of the shared Redis, say). Names far from every setting are
    left alone: other tools may use the prefix."""
    settings = [f"LABELER_{name.upper()}" for name in Settings.model_fields]
    out = []
    for name in sorted(environ):
        key = name.upper()  # settings are read whatever the case of their names
        if not key.startswith("LABELER_") or key in settings or key in OTHER_VARIABLES:
            continue
        near = difflib.get_close_matches(key, settings, n=1, cutoff=0.8)
        if near:
            out.append(f"{name} is not a setting and is ignored; did you mean {near[0]}?")
    return out
