"""How any exception a request raises becomes its HTTP answer: one mapping, and the app's handlers.

A :class:`~service.errors.ServiceError` answers with its own status, body and headers; the
framework's errors (a request that fails its schema, an undecodable body, werkzeug's HTTP errors)
are answered in the same JSON shape; anything else is a 500 that tells nothing of its cause.
"""

from __future__ import annotations

import logging
from typing import Any

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from .errors import ServiceError, describe_validation_error, error_body

log = logging.getLogger("loopgate")

ErrorAnswer = tuple[dict[str, Any], int, dict[str, str]]


def error_response(error: BaseException, *, max_body_bytes: int | None = None) -> ErrorAnswer:
    """The JSON body, status and headers that answer a request which raised ``error``.

    Args:
        error: any exception.
        max_body_bytes: the app's body limit, named in the answer to a body that is too large.
    """
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

    for handled in (ServiceError, RequestSchemaValidationError, UnicodeDecodeError, HTTPException):
        app.register_error_handler(handled, answer)
    app.register_error_handler(Exception, unexpected)
