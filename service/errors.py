"""One error hierarchy for the whole service, and its mapping to HTTP and websocket close codes.

Every error a handler can raise on purpose is a :class:`ServiceError`. Its ``status_code`` and
``status`` (Google's canonical code name) decide the response; ``retry_after`` adds a ``Retry-After``
header. The JSON body has the shape Google APIs use::

    {"error": {"code": 503, "status": "UNAVAILABLE", "message": "..."}}

:mod:`service.error_responses` turns any exception (these and the framework's own) into that answer.
A stream the server ends after ``websocket.accept()`` is closed with the code and reason
:func:`close_frame` gives; the ``CLOSE_*`` codes are defined here and nowhere else.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from pydantic import BaseModel

# HTTP status -> Google canonical status name, for errors that did not come from a ServiceError.
CANONICAL_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "DEADLINE_EXCEEDED",
    409: "ALREADY_EXISTS",
    411: "LENGTH_REQUIRED",
    412: "FAILED_PRECONDITION",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "OUT_OF_RANGE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class ServiceError(Exception):
    """Base of every error the service answers on purpose."""

    status_code: ClassVar[int] = 500
    status: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"

    def body(self) -> dict[str, Any]:
        return error_body(self.status_code, self.message, self.status)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class InvalidArgument(ServiceError):
    """The request is malformed; nothing was changed."""

    status_code = 400
    status = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """A resource is not allowed here or does not exist."""

    status_code = 404
    status = "NOT_FOUND"

    def __init__(self, message: str, *, resource: str) -> None:
        super().__init__(message)
        self.resource = resource


class TopicNotFound(NotFound):
    """A topic that is not served here or does not exist."""

    def __init__(self, topic: str, *, reason: str = "does not exist") -> None:
        super().__init__(f"topic {topic!r} {reason}", resource=topic)
        self.topic = topic


class SubscriptionNotFound(NotFound):
    """A subscription that is not served here or does not exist."""

    def __init__(self, subscription: str, *, reason: str = "does not exist") -> None:
        super().__init__(f"subscription {subscription!r} {reason}", resource=subscription)
        self.subscription = subscription


class PermissionDenied(ServiceError):
    """The backend refused the service's own credentials."""

    status_code = 403
    status = "PERMISSION_DENIED"


class ClientDisconnected(ServiceError):
    """The client went away before its request body was complete; nothing was changed.

    Answered 400, which normally reaches nobody: it is there for the log and a proxy that waits.
    """

    status_code = 400
    status = "INVALID_ARGUMENT"


class RequestTimeout(ServiceError):
    """The client was too slow sending its request: answered 408, and the connection is closed."""

    status_code = 408
    status = "DEADLINE_EXCEEDED"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class BodyStalled(RequestTimeout):
    """The client sent nothing of its request body for ``idle_timeout`` seconds."""

    def __init__(self, idle_timeout: float) -> None:
        super().__init__(f"the client sent nothing of the body for {idle_timeout:g}s")
        self.idle_timeout = idle_timeout


class PreconditionFailed(ServiceError):
    """A condition of the request (``If-None-Match``, a generation) does not hold."""

    status_code = 412
    status = "FAILED_PRECONDITION"


class PayloadTooLarge(ServiceError):
    """The request body is larger than allowed; it was not read."""

    status_code = 413
    status = "PAYLOAD_TOO_LARGE"


class RangeNotSatisfiable(ServiceError):
    """The requested byte range lies outside the object."""

    status_code = 416
    status = "OUT_OF_RANGE"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size

    def headers(self) -> dict[str, str]:
        return {"Content-Range": f"bytes */{self.size}"}


class Unavailable(ServiceError):
    """A backend cannot serve the request now; try again after ``retry_after`` seconds."""

    status_code = 503
    status = "UNAVAILABLE"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class NotReady(Unavailable):
    """Some client the service needs is down: ``/readyz`` answers 503 naming every client.

    ``clients`` maps each client's name to ``"ok"`` or ``"down: <reason>"``; the body carries it
    beside ``error``.
    """

    def __init__(self, message: str, *, clients: dict[str, str], retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
        self.clients = clients

    def body(self) -> dict[str, Any]:
        return super().body() | {"clients": self.clients}


class PublisherOverloaded(Unavailable):
    """Accepting more messages would exceed the publisher's pending bounds."""


class BackendError(Unavailable):
    """A backend call failed after retries; the backend's message is kept."""

    def __init__(self, backend: str, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(f"{backend}: {message}", retry_after=retry_after)
        self.backend = backend


class Unauthenticated(ServiceError):
    """No credentials, or credentials that are not valid: answered 401 with ``WWW-Authenticate``.

    ``error`` is the RFC 6750 error code (``invalid_request``, ``invalid_token``) or ``None`` when
    no credentials were sent at all. Messages never contain the credential itself.
    """

    status_code = 401
    status = "UNAUTHENTICATED"

    def __init__(self, message: str, *, error: str | None = None) -> None:
        super().__init__(message)
        self.error = error

    def headers(self) -> dict[str, str]:
        challenge = 'Bearer realm="loopgate"'
        if self.error:
            challenge += f', error="{self.error}", error_description="{_quote(self.message)}"'
        return {"WWW-Authenticate": challenge}


class Forbidden(ServiceError):
    """Valid credentials without the scope the request needs: answered 403."""

    status_code = 403
    status = "PERMISSION_DENIED"

    def __init__(self, message: str, *, scope: str | None = None) -> None:
        super().__init__(message)
        self.scope = scope

    def headers(self) -> dict[str, str]:
        if self.scope is None:
            return {}
        return {
            "WWW-Authenticate": f'Bearer realm="loopgate", error="insufficient_scope", '
            f'scope="{_quote(self.scope)}"'
        }


class RateLimited(ServiceError):
    """A per-token limit is reached: answered 429 with ``Retry-After``."""

    status_code = 429
    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


# Websocket close codes (RFC 6455, section 7.4.1) the service closes its streams with.
CLOSE_NORMAL = 1000  # the stream is over (idle timeout)
CLOSE_GOING_AWAY = 1001  # the server is shutting down, or the connection is ending
CLOSE_POLICY_VIOLATION = 1008  # the client may not have this stream (credentials, scope, request)
CLOSE_INTERNAL_ERROR = 1011  # the server failed
CLOSE_TRY_AGAIN_LATER = 1013  # overloaded or a backend is down: reconnect later


class StreamClosed(Exception):
    """The server ends a subscriber's stream: ``code`` is the websocket close code.

    Not a :class:`ServiceError`: it is never an HTTP answer, only the end of a stream that was
    already accepted (an SSE stream simply ends).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code}, {self.reason!r})"


class ErrorResponse(BaseModel):
    """The JSON error body, for the OpenAPI description."""

    error: dict[str, Any]


def _quote(text: str) -> str:
    """``text`` made safe inside a quoted header parameter."""
    return "".join(c for c in text if c.isprintable() and c not in '"\\')


def error_body(code: int, message: str, status: str | None = None) -> dict[str, Any]:
    """The JSON error body for ``code``."""
    return {
        "error": {
            "code": code,
            "status": status or CANONICAL_STATUS.get(code, "UNKNOWN"),
            "message": message,
        }
    }


def describe_validation_error(error: Exception) -> str:
    """One line naming every invalid field of a pydantic ``ValidationError``."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return f"invalid request: {error}"
    parts = []
    for item in errors():
        location = ".".join(str(part) for part in item.get("loc", ()))
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "invalid request: " + "; ".join(parts)
