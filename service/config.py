"""Service settings: one typed object read from ``LOOPGATE_*`` environment variables.

Every setting is a field of :class:`Settings`; the environment variable is the field name upper-cased
with the ``LOOPGATE_`` prefix (``publish_max_latency`` is ``LOOPGATE_PUBLISH_MAX_LATENCY``). A variable
with the prefix that names no field, or a value that does not parse, stops startup with a message that
names the variable: a typo must never silently fall back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
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
    # Readiness (service/routes/health.py): what /readyz asks of the backends, and how often.
    ready_timeout: float = Field(
        default=2.0,
        gt=0,
        description="Seconds a readiness check's backend call (Pub/Sub, Cloud Storage) may take "
        "before /readyz reports the client down.",
    )
    ready_interval: float = Field(
        default=2.0,
        ge=0,
        description="Seconds a readiness check's outcome is reused: each client's backend is "
        "called at most once per interval per worker, however often /readyz is asked.",
    )
    ready_publish_stall: float = Field(
        default=5.0,
        gt=0,
        description="A publish call waiting longer than this for Pub/Sub makes /readyz report the "
        "publisher down.",
    )

    publish_max_messages: int = Field(default=1000, ge=1, le=1000)
    publish_max_bytes: int = Field(default=4_000_000, ge=1024, le=10_000_000)
    publish_max_latency: float = Field(default=0.005, ge=0, le=1.0)
    publish_max_in_flight: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Pub/Sub calls in flight per topic (and ordering key) before a batch that is "
        "not full waits for an answer.",
    )
    publish_timeout: float = Field(default=30.0, gt=0)
    publish_max_pending_messages: int = Field(default=100_000, ge=1)
    publish_max_pending_bytes: int = Field(default=128 * 1024 * 1024, ge=1024)

    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    gc_tuning: bool = Field(
        default=True, description="Freeze startup's objects and collect garbage less often."
    )
    malloc_tuning: bool = Field(
        default=True, description="Keep large buffers on glibc's heap instead of mapping each."
    )

    # Authentication (service/auth/access.py): on unless explicitly "disabled".
    auth: Literal["enabled", "disabled"] = Field(default="enabled")
    auth_file: Path | None = Field(default=None, description="TOML file of API tokens.")
    auth_reload_interval: float = Field(
        default=2.0, ge=0, description="Seconds between checks of the token file (0: SIGHUP only)."
    )
    jwt_secret: SecretStr | None = Field(default=None, description="HS256 shared secret.")
    jwt_public_key_file: Path | None = Field(default=None, description="RS256/ES256 PEM key.")
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_scope_claim: str = Field(default="scope", min_length=1)
    jwt_leeway: float = Field(default=10.0, ge=0, description="Clock skew allowed (seconds).")
    jwt_max_ttl: float = Field(default=86400.0, gt=0, description="Longest JWT lifetime accepted.")
    allowed_origins: CommaList = Field(
        default=(),
        description="Browser origins allowed to open websockets and to call the HTTP routes "
        "cross-origin (CORS) ('*': any).",
    )

    # Per-token limits, per worker process (service/auth/limits.py); 0 turns a rate limit off.
    publish_rate: float = Field(default=200.0, ge=0, description="Publish requests/s per token.")
    publish_burst: int = Field(default=400, ge=1)
    publish_byte_rate: float = Field(default=20 * 1024 * 1024, ge=0, description="Bytes/s.")
    publish_byte_burst: int = Field(default=40 * 1024 * 1024, ge=1)
    max_connections_per_token: int = Field(default=100, ge=1)

    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Websocket and SSE subscribers (see service/streams/hub.py and service/routes/subscribe.py).
    subscriptions: CommaList = Field(
        default=(), description="Subscriptions served in queue mode (comma separated; '*' all)."
    )
    stream_max_connections: int = Field(default=10_000, ge=1, description="Per worker.")
    stream_queue_size: int = Field(default=1000, ge=1, description="Messages per connection.")
    stream_slow_policy: Literal["drop-oldest", "close"] = Field(
        default="drop-oldest",
        description="A full connection queue drops its oldest or closes (1013).",
    )
    stream_max_frame_messages: int = Field(default=500, ge=1, description="Per coalesced frame.")
    stream_frame_rate: float = Field(
        default=25_000,
        gt=0,
        description="Websocket frames per second a worker aims at per topic: messages wait up to "
        "subscribers / rate seconds to share a frame.",
    )
    stream_max_coalesce_delay: float = Field(
        default=0.25, ge=0, description="Longest a message waits to share a frame (seconds)."
    )
    stream_idle_timeout: float = Field(
        default=3600.0,
        ge=0,
        description="Close a connection without traffic either way (0: never).",
    )
    stream_heartbeat: float = Field(default=15.0, gt=0, description="SSE comment interval.")
    stream_compression: bool = Field(
        default=False,
        description="Accept permessage-deflate from websocket clients that offer it (Hypercorn).",
    )
    # A reconnecting subscriber's cursor is served from the worker's recent history of the
    # topic when it reaches back far enough (see service/streams/history.py), else from
    # Pub/Sub's retention. The defaults cover a reconnect after a dropped connection or the
    # 60-minute websocket limit of Cloud Run (seconds) at up to ~80 messages/s, in at most
    # 8 MiB per topic per worker; longer gaps (a deploy, a new instance) go to Pub/Sub.
    stream_history_messages: int = Field(
        default=10_000, ge=0, description="Messages of recent history kept per topic (0: none)."
    )
    stream_history_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=0,
        description="Bytes of serialized messages of recent history kept per topic.",
    )
    stream_history_seconds: float = Field(
        default=120.0, ge=0, description="Longest a message stays in a topic's recent history."
    )
    stream_resume_slack: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="Seconds before a resume cursor's publish time, and after a catch-up's seam, "
        "that a resume by time covers: how far out of publish order Pub/Sub may deliver.",
    )
    fanout_prefix: str = Field(default="loopgate", pattern=r"^[a-z][a-z0-9-]{0,30}$")
    fanout_grace: float = Field(
        default=30.0, ge=0, description="Keep a topic's subscription after its last subscriber."
    )
    fanout_max_outstanding: int = Field(default=5000, ge=1)
    queue_max_outstanding: int = Field(default=100, ge=1, description="Per queue connection.")
    queue_max_lease: float = Field(default=600.0, ge=10, description="Longest a message is held.")

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
    storage_connect_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a Cloud Storage call may wait for a connection (a free one of the "
        "worker's pool, then the backend's) before answering 503.",
    )
    upload_idle_timeout: float = Field(
        default=60.0, gt=0, description="Seconds an upload's client may send nothing (408)."
    )
    download_idle_timeout: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a download's client may take nothing before the download is ended "
        "and its backend connection released.",
    )
    # Signed URLs and upload sessions for direct transfers (service/routes/storage_signed.py).
    signed_url_max_seconds: int = Field(
        default=3600,
        ge=1,
        le=604_800,
        description="Longest lifetime a signed URL may be asked for (seconds; Cloud Storage "
        "allows at most 7 days); a longer request is refused with 400.",
    )
    signing_service_account: str | None = Field(
        default=None,
        pattern=r"^[^@\s/]+@[^@\s/]+$",
        description="Service account whose key signs URLs through the IAM signBlob API. Default: "
        "the key of GOOGLE_APPLICATION_CREDENTIALS if it is a service-account key file, else "
        "the runtime's own service account (from the metadata server).",
    )
    iam_endpoint: str = Field(
        default="https://iamcredentials.googleapis.com",
        pattern=r"^https?://[^/\s]+/?$",
        description="Base URL of the IAM Credentials API that signs URLs without a key; change it "
        "only for tests or a private endpoint.",
    )
    http_max_connections: int = Field(
        default=256,
        ge=1,
        description="Connections the worker's shared HTTP session (Cloud Storage, and clients of "
        "your own built on it) holds open at once; every transfer in progress holds one.",
    )

    @field_validator("topics", "subscriptions", "allowed_origins", "buckets", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    def topic_allowed(self, topic: str) -> bool:
        """Whether ``topic`` (a short name) is in the ``LOOPGATE_TOPICS`` allowlist."""
        return "*" in self.topics or topic in self.topics

    def subscription_allowed(self, subscription: str) -> bool:
        """Whether ``subscription`` is in the ``LOOPGATE_SUBSCRIPTIONS`` allowlist."""
        return "*" in self.subscriptions or subscription in self.subscriptions

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


def current_settings() -> Settings:
    """The settings of the app serving the current request, websocket or background task.

    They are the ``config`` of the bound client registry, so client factories reach them too.

    Raises:
        RuntimeError: no loopgate registry is bound (called outside the app).
    """
    from .loopclients import current_registry

    config = current_registry().config
    if not isinstance(config, Settings):
        raise RuntimeError("the bound client registry was not made by loopgate's create_app()")
    return config
