"""Per-token limits: publish rate (requests and bytes per second) and open streams.

Limits are kept per worker process, keyed by the identity's name: an instance with N workers allows
up to N times each limit. Rate limits are token buckets (a burst, refilled at the rate); a request
that finds its bucket short is answered 429 with ``Retry-After``, the time until it would fit.
With authentication disabled there is no token to key on, and no per-token limit applies.

Routes use them as::

    @requires("publish", "topic")
    @publish_limited                       # charges one request and its body's bytes
    async def publish(topic): ...

    @requires("subscribe", "topic")
    async def stream(topic):
        async with connection_slot():      # 429 at the handshake when the token has too many
            await websocket.accept()
            ...
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from quart import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from ..config import Settings
from ..errors import RateLimited
from .access import current_identity
from .tokens import Identity

P = ParamSpec("P")
R = TypeVar("R")

EXTENSION = "loopgate.limits"
_MAX_IDLE_BUCKETS = 10_000


@dataclass
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second.

    A cost larger than the capacity is let through when the bucket is full and leaves it in debt,
    so one large request is never refused forever; the debt delays the next ones.
    """

    rate: float
    capacity: float
    tokens: float = math.nan
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if math.isnan(self.tokens):
            self.tokens = self.capacity

    def _refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, cost: float, now: float | None = None) -> float:
        """Seconds until ``cost`` fits (0 when it fits now)."""
        self._refill(time.monotonic() if now is None else now)
        needed = min(cost, self.capacity)
        return 0.0 if self.tokens >= needed else (needed - self.tokens) / self.rate

    def take(self, cost: float) -> None:
        self.tokens -= cost

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class Limiter:
    """The limits of one worker process: buckets and open-stream counts per identity."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._connections: dict[str, int] = {}

    def _bucket(self, identity: Identity, kind: str, rate: float, burst: float) -> TokenBucket:
        key = (identity.name, kind)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate:
            if len(self._buckets) >= _MAX_IDLE_BUCKETS:
                self._forget_full_buckets()
            bucket = self._buckets[key] = TokenBucket(rate, max(burst, 1.0))
        return bucket

    def _forget_full_buckets(self) -> None:
        # A full bucket behaves like a new one, so dropping it loses nothing.
        now = time.monotonic()
        for key in [key for key, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]

    def charge_publish(self, identity: Identity, nbytes: int) -> None:
        """Take one request and ``nbytes`` from the identity's publish buckets.

        Raises:
            RateLimited: a bucket is short; nothing was taken.
        """
        if identity.kind == "anonymous":
            return
        settings, own = self.settings, identity.limits
        rate = own.publish_rate if own.publish_rate is not None else settings.publish_rate
        byte_rate = (
            own.publish_byte_rate
            if own.publish_byte_rate is not None
            else settings.publish_byte_rate
        )
        buckets: list[tuple[TokenBucket, float, str]] = []
        if rate > 0:
            scale = rate / settings.publish_rate if settings.publish_rate else 1.0
            burst = settings.publish_burst * scale
            buckets.append((self._bucket(identity, "requests", rate, burst), 1, "requests"))
        if byte_rate > 0:
            scale = byte_rate / settings.publish_byte_rate if settings.publish_byte_rate else 1.0
            burst = settings.publish_byte_burst * scale
            buckets.append((self._bucket(identity, "bytes", byte_rate, burst), nbytes, "bytes"))
        waits = [(bucket.wait_time(cost), what) for bucket, cost, what in buckets]
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(
                f"publish rate limit of {identity.name!r} reached ({what} per second)",
                retry_after=wait,
            )
        for bucket, cost, _ in buckets:
            bucket.take(cost)

    def max_connections(self, identity: Identity) -> int:
        own = identity.limits.max_connections
        return own if own is not None else self.settings.max_connections_per_token

    def check_slot(self, identity: Identity) -> None:
        """Raise :class:`RateLimited` if the identity holds its maximum of stream connections."""
        if identity.kind == "anonymous":
            return
        limit = self.max_connections(identity)
        if self._connections.get(identity.name, 0) >= limit:
            raise RateLimited(
                f"{identity.name!r} already has {limit} open streams", retry_after=1.0
            )

    def slot(self, identity: Identity) -> _Slot:
        """``async with limiter.slot(identity)``: hold one of the identity's stream connections
        while the block runs.

        Raises (on entering):
            RateLimited: the identity already holds its maximum.
        """
        return _Slot(self, identity)

    def _take_slot(self, identity: Identity) -> bool:
        self.check_slot(identity)
        if identity.kind == "anonymous":
            return False
        self._connections[identity.name] = self._connections.get(identity.name, 0) + 1
        return True

    def _release_slot(self, identity: Identity) -> None:
        left = self._connections[identity.name] - 1
        if left:
            self._connections[identity.name] = left
        else:
            del self._connections[identity.name]


class _Slot:
    """What :meth:`Limiter.slot` returns. A class rather than ``@asynccontextmanager``, whose
    generator would stay alive, with its frame, for as long as each stream connection."""

    __slots__ = ("_identity", "_limiter", "_taken")

    def __init__(self, limiter: Limiter, identity: Identity) -> None:
        self._limiter = limiter
        self._identity = identity
        self._taken = False

    async def __aenter__(self) -> None:
        self._taken = self._limiter._take_slot(self._identity)

    async def __aexit__(self, *exc_info: object) -> None:
        if self._taken:
            self._taken = False
            self._limiter._release_slot(self._identity)


def current_limiter() -> Limiter:
    """The limiter of the running app."""
    limiter: Limiter = current_app.extensions[EXTENSION]
    return limiter


def connection_slot(identity: Identity | None = None) -> Any:
    """``async with connection_slot():`` holds one of the caller's stream connections.

    Call it before ``websocket.accept()`` (or before an SSE response starts) so a refusal is an
    HTTP 429 at the handshake. ``identity`` defaults to the one the request authenticated as.

    Raises:
        RateLimited: the token already has ``LOOPGATE_MAX_CONNECTIONS_PER_TOKEN`` open streams.
    """
    return current_limiter().slot(identity or current_identity())


def publish_limited(view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorate a publish view (below :func:`~service.auth.access.requires`): charge the caller's
    publish buckets one request and the body's bytes, or answer 429."""

    @functools.wraps(view)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        nbytes = request.content_length
        if nbytes is None:
            nbytes = len(await request.get_data(cache=True))  # 413 past the size limit
        elif (limit := request.max_content_length) is not None and nbytes > limit:
            # Refused whatever the budget (a 429 would invite a retry that fails again), and
            # nothing is charged for it.
            raise RequestEntityTooLarge()
        current_limiter().charge_publish(current_identity(), nbytes)
        return await view(*args, **kwargs)

    return wrapper
