"""How any exception becomes its answer: an HTTP status, body and headers, or a websocket close.

A :class:`~service.errors.ServiceError` answers with its own status, body and headers; the
client registry's errors (:mod:`service.loopclients`, which knows nothing of HTTP) are a 503 with
``Retry-After`` for a client that is down and a 500 for a client used from a foreign loop; the
framework's errors (a request that fails its schema, an undecodable body, werkzeug's HTTP errors)
are answered in the same JSON shape; anything else is a 500 that tells nothing of its cause.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from .errors import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    RateLimited,
    ServiceError,
    StreamClosed,
    Unavailable,
    describe_validation_error,
    error_body,
)
from .loopclients import ClientUnavailable

log = logging.getLogger("loopgate")

ErrorAnswer = tuple[dict[str, Any], int, dict[str, str]]

_MAX_CLOSE_REASON = 123  # bytes: a close frame's payload is at most 125, the code included


def error_response(error: BaseException, *, max_body_bytes: int | None = None) -> ErrorAnswer:
    """The JSON body, status and headers that answer a request which raised ``error``.

    Args:
        error: any exception.
        max_body_bytes: the app's body limit, named in the answer to a body that is too large.
    """
    if isinstance(error, ClientUnavailable):
        error = Unavailable(error.message, retry_after=error.retry_after)
    if isinstance(error, ServiceError):
        return error.body(), error.status_code, error.headers()
    if isinstance(error, RequestSchemaValidationError):
        return error_body(400, describe_validation_error(error.validation_error)), 400, {}
    if isinstance(error, UnicodeDecodeError):
        # Quart decodes the body as UTF-8 before parsing JSON; bad bytes are the caller's fault.
        return error_body(400, "request body is not valid UTF-8"), 400, {}
    if isinstance(error, HTTPException):
        code = error.code or 500
        message = error.description or error.name
        if code == 413 and max_body_bytes is not None:
            message = f"request body larger than {max_body_bytes} bytes"
        allowed = getattr(error, "valid_methods", None)
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        return error_body(code, message), code, headers
    return error_body(500, "internal error"), 500, {}


def register_error_handlers(app: Quart) -> None:
    """Answer every error ``app``'s requests raise through :func:`error_response`; unexpected
    ones are logged with their traceback first."""

    async def answer(error: Exception) -> tuple[Response, int, dict[str, str]]:
        body, status, headers = error_response(
            error, max_body_bytes=app.config["MAX_CONTENT_LENGTH"]
        )
        return jsonify(body), status, headers

    async def unexpected(error: Exception) -> tuple[Response, int, dict[str, str]]:
        log.exception("unhandled error", exc_info=error)
        return await answer(error)

    handled_types = (
        ServiceError,
        ClientUnavailable,
        RequestSchemaValidationError,
        UnicodeDecodeError,
        HTTPException,
    )
    for handled in handled_types:
        app.register_error_handler(handled, answer)
    app.register_error_handler(Exception, unexpected)


def close_frame(error: BaseException) -> tuple[int, str]:
    """The websocket close code and reason that end an accepted stream because of ``error``.

    :class:`~service.errors.StreamClosed` keeps its own; credentials, scope and request errors are a policy
    violation (1008); :class:`~service.errors.Unavailable` (a client that is down included) and
    :class:`~service.errors.RateLimited` ask the client to try again
    later (1013); anything else is an internal error (1011) whose detail stays in the server.
    The reason is cut to the 123 bytes a close frame can carry.
    """
    if isinstance(error, ClientUnavailable):
        error = Unavailable(error.message, retry_after=error.retry_after)
    if isinstance(error, StreamClosed):
        code, reason = error.code, error.reason
    elif isinstance(error, (Unavailable, RateLimited)):
        code, reason = CLOSE_TRY_AGAIN_LATER, error.message
    elif isinstance(error, ServiceError) and error.status_code < 500:
        code, reason = CLOSE_POLICY_VIOLATION, error.message
    elif isinstance(error, ServiceError):
        code, reason = CLOSE_INTERNAL_ERROR, error.message
    else:
        code, reason = CLOSE_INTERNAL_ERROR, "internal error"
    encoded = reason.encode()
    if len(encoded) > _MAX_CLOSE_REASON:
        reason = encoded[:_MAX_CLOSE_REASON].decode(errors="ignore")
    return code, reason
