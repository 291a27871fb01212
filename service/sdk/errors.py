"""The errors that end a subscription: the server refused it, or will not have it go on.

Everything else (a network error, a server restarting, 429 and 5xx answers, close codes other than
1008) is retried by the subscriber and never raised.
"""

from __future__ import annotations

from http import HTTPStatus


class SubscribeError(Exception):
    """The subscription cannot go on; retrying with the same request would not help.

    Attributes:
        message: what the server said (its JSON error message, a close frame's reason), or a
            description of the status when it said nothing readable.
        status: the HTTP status that refused the handshake, or ``None``.
        code: the websocket close code that ended the stream, or ``None``.
    """

    def __init__(self, message: str, *, status: int | None = None, code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        if self.status is not None:
            return f"{self.status}: {self.message}"
        if self.code is not None:
            return f"closed with {self.code}: {self.message}"
        return self.message


class BadRequest(SubscribeError):
    """400: a malformed topic name or resume cursor, or a cursor of another topic."""


class Unauthorized(SubscribeError):
    """401: no token, or one that is not valid (expired, unknown)."""


class Forbidden(SubscribeError):
    """403: the token may not subscribe to this topic, or the Origin is refused."""


class NotFound(SubscribeError):
    """404: the topic does not exist or is not served."""


class PolicyViolation(SubscribeError):
    """The server closed the websocket with 1008: the stream may not go on with these
    credentials or this request."""


class ProtocolError(SubscribeError):
    """The server sent something that is not a loopgate stream (a proxy's page, a bad frame)."""


_BY_STATUS: dict[int, type[SubscribeError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
}


def refusal(status: int, message: str | None) -> SubscribeError:
    """The error for a handshake refused with the 4xx ``status`` (not 429, which is retried)."""
    if not message:
        try:
            message = HTTPStatus(status).phrase
        except ValueError:
            message = "refused"
    return _BY_STATUS.get(status, SubscribeError)(message, status=status)
