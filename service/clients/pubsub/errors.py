"""Pub/Sub failures as the service's errors, keeping the backend's own message.

A missing topic or subscription is 404, a bad request 400, a refused credential 403; everything
else (unavailable, deadline exceeded, throttled, internal, retries exhausted) is 503 with
``Retry-After``::

    try:
        await admin.get_subscription(subscription=path, timeout=10)
    except gexc.GoogleAPIError as exc:
        raise translate(exc, subscription=name) from exc
"""

from __future__ import annotations

from google.api_core import exceptions as gexc

from ...errors import (
    BackendError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ServiceError,
    SubscriptionNotFound,
    TopicNotFound,
)

BACKEND = "pubsub"
RETRY_AFTER = 1.0


def translate(
    exc: gexc.GoogleAPIError,
    *,
    topic: str | None = None,
    subscription: str | None = None,
    operation: str = "the call",
    timeout: float | None = None,
) -> ServiceError:
    """The service error for a failed Pub/Sub call.

    Args:
        exc: what the Google client raised (a ``GoogleAPICallError`` or a ``RetryError``).
        topic: the topic the call named (short name or full path), for a ``NotFound``.
        subscription: the subscription the call named; a ``NotFound`` names it rather than
            ``topic`` when both are given.
        operation: what the call did (``"publish"``), for the message of exhausted retries.
        timeout: the retry deadline in seconds, for that same message.
    """
    if isinstance(exc, gexc.RetryError):
        cause = exc.cause if exc.cause is not None else exc
        within = f"within {timeout:g}s" if timeout is not None else "before its deadline"
        return BackendError(
            BACKEND, f"{operation} did not succeed {within}: {cause}", retry_after=RETRY_AFTER
        )
    message = _message(exc)
    if isinstance(exc, gexc.NotFound):
        if subscription is not None:
            return SubscriptionNotFound(_short(subscription))
        if topic is not None:
            return TopicNotFound(_short(topic))
        return NotFound(f"{BACKEND}: {message}", resource="")
    if isinstance(exc, (gexc.PermissionDenied, gexc.Unauthenticated)):
        return PermissionDenied(f"{BACKEND}: {message}")
    if isinstance(exc, gexc.InvalidArgument):
        return InvalidArgument(message)
    return BackendError(BACKEND, message, retry_after=RETRY_AFTER)


def _message(exc: gexc.GoogleAPIError) -> str:
    message = getattr(exc, "message", None)
    return str(message) if message else str(exc)


def _short(name: str) -> str:
    """``projects/p/topics/t`` -> ``t``; a short name is kept."""
    return name.rsplit("/", 1)[-1]
