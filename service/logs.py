"""Structured logs: one JSON object per line, each with the request id of the request it belongs to.

Every request gets an id: a sane incoming ``X-Request-ID`` (1-128 characters of letters, digits and
``-_.:``) or a new one. It is returned in the ``X-Request-ID`` response header and is a field of every
log line written while the request runs. Hypercorn's access log uses the same formatter (see
``logconfig_dict`` in hypercorn.toml) and takes the id from the response header.

Credentials and message data are never passed to a logger. As a second line of defence the formatter
masks anything that looks like a bearer credential, a JWT or an ``access_token`` parameter.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

from quart import Quart, Response, g, has_websocket_context, request, websocket
from quart.typing import ResponseTypes

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_ID = re.compile(r"[A-Za-z0-9\-_.:]{1,128}")
_SECRETS = re.compile(
    r"(?i)(bearer\s+)\S+"
    r"|(access_token=)[^&\s\"']+"
    r"|eyJ[\w-]*\.[\w-]*\.[\w-]*"
    r"|\blg_[\w-]{16,}"
)

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "loopgate.request_id", default=None
)
principal_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "loopgate.principal", default=None
)

_HANDLER_MARK = "_loopgate_handler"
# Access log fields taken from Hypercorn's atoms: never the query string, never request headers.
_ACCESS_FIELDS = {
    "h": "remote",
    "m": "method",
    "U": "path",
    "H": "protocol",
    "s": "status",
    "b": "bytes",
    "D": "duration_us",
}


def redact(text: str) -> str:
    """``text`` with anything credential-like masked."""

    def mask(match: re.Match[str]) -> str:
        prefix = match.group(1) or match.group(2) or ""
        return prefix + "[redacted]"

    return _SECRETS.sub(mask, text)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, principal,
    and the exception if any. Hypercorn access records become named fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
        }
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            atoms = record.args
            for atom, name in _ACCESS_FIELDS.items():
                entry[name] = atoms[atom]
            entry["request_id"] = atoms["{x-request-id}o"]
            entry["message"] = f"{atoms['m']} {atoms['U']} {atoms['s']}"
        else:
            entry["message"] = redact(record.getMessage())
            request_id = getattr(record, "request_id", None) or request_id_var.get()
            if request_id:
                entry["request_id"] = request_id
            principal = principal_var.get()
            if principal:
                entry["principal"] = principal
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Send the ``loopgate`` loggers to stderr, as JSON lines (``fmt="json"``) or plain text.

    Idempotent: calling it again replaces the handler it installed before.
    """
    logger = logging.getLogger("loopgate")
    for handler in [h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")
        )
    logger.addHandler(handler)
    logger.setLevel(level)


def _incoming_id() -> str:
    headers = websocket.headers if has_websocket_context() else request.headers
    value = headers.get(REQUEST_ID_HEADER, "")
    return value if _SANE_ID.fullmatch(value) else os.urandom(16).hex()


def current_request_id() -> str | None:
    """The id of the request being served."""
    return request_id_var.get()


def init_request_ids(app: Quart) -> None:
    """Give every request and websocket an id, in the logs and in ``X-Request-ID``."""

    @app.before_request
    @app.before_websocket
    async def assign_id() -> None:
        g.loopgate_request_id = _incoming_id()
        request_id_var.set(g.loopgate_request_id)
        principal_var.set(None)

    @app.after_request
    async def return_id(response: Response) -> Response:
        request_id = g.get("loopgate_request_id")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @app.after_websocket
    async def return_ws_id(response: ResponseTypes | None) -> ResponseTypes | None:
        request_id = g.get("loopgate_request_id")
        if response is not None and request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
