"""Service settings: one typed object read from ``LOOPGATE_*`` environment variables.

Every setting is a field of :class:`Settings`; the environment variable is the field name upper-cased
with the ``LOOPGATE_`` prefix (``publish_max_latency`` is ``LOOPGATE_PUBLISH_MAX_LATENCY``). A variable
with the prefix that names no field, or a value that does not parse, stops startup with a message that
names the variable: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "LOOPGATE_"

CommaList = Annotated[tuple[str, ...], NoDecode]


class SettingsError(Exception):
    """A ``LOOPGATE_*`` variable is unknown or has a bad value."""


class Settings(BaseSettings):
    """Typed service settings. Defaults are production defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    project: str = Field(min_length=1, description="Google Cloud project id.")
    topics: CommaList = Field(
        default=(), description="Topics that may be used (comma separated; '*' allows all)."
    )

    eager: bool = Field(default=True, description="Create every client at startup.")
    client_create_timeout: float = Field(default=5.0, gt=0)
    client_close_timeout: float = Field(default=10.0, gt=0)
    backoff_initial: float = Field(default=0.5, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)

    publish_max_messages: int = Field(default=1000, ge=1, le=1000)
    publish_max_bytes: int = Field(default=4_000_000, ge=1024, le=10_000_000)
    publish_max_latency: float = Field(default=0.005, ge=0, le=1.0)
    publish_timeout: float = Field(default=30.0, gt=0)
    publish_max_pending_messages: int = Field(default=100_000, ge=1)
    publish_max_pending_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)

    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)

    buckets: CommaList = Field(
        default=(),
        description="Cloud Storage buckets that may be used (comma separated; '*' allows all).",
    )
    max_object_bytes: int = Field(
        default=5 * 1024**4,
        ge=1,
        description="Largest object accepted by an upload; larger bodies are refused with 413.",
    )
    storage_chunk_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=256 * 1024,
        multiple_of=256 * 1024,
        description=(
            "Uploads up to this size are buffered and sent in one request; larger uploads of "
            "unknown length are forwarded in pieces of this size (a multiple of 256 KiB)."
        ),
    )
    storage_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a Cloud Storage call may wait for data."
    )

    @field_validator("topics", "buckets", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def topic_allowed(self, topic: str) -> bool:
        """Whether ``topic`` (a short name) is in the ``LOOPGATE_TOPICS`` allowlist."""
        return "*" in self.topics or topic in self.topics

    def bucket_allowed(self, bucket: str) -> bool:
        """Whether ``bucket`` is in the ``LOOPGATE_BUCKETS`` allowlist."""
        return "*" in self.buckets or bucket in self.buckets

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read :class:`Settings` from ``environ`` (default ``os.environ``) plus keyword overrides.

    Raises:
        SettingsError: a ``LOOPGATE_*`` variable is unknown, or a value is missing or invalid.
    """
    env = os.environ if environ is None else environ
    known = {name.upper() for name in Settings.model_fields}
    for key in sorted(env):
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :] not in known:
            raise SettingsError(f"unknown setting {key}: loopgate has no such setting")
    values: dict[str, Any] = {
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
    }
    values.update(overrides)
    try:
        # Validate the collected values only, so that tests and callers passing ``environ``
        # are not mixed with the process environment.
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"]) or "settings"
            problems.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
