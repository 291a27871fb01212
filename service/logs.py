"""Structured logs: one JSON object per line, each with the request id of the request it belongs to.

Every request gets an id (:mod:`service.request_ids`), returned in the ``X-Request-ID`` response
header; it is a field of every log line written while the request runs. Hypercorn's access log uses
the same formatter (see ``logconfig_dict`` in hypercorn.toml) and takes the id from the response
header.

Every line the service writes is JSON, the event loop's own reports included:
:func:`configure_logging` gives every logger the same handler, and :func:`init_loop_logging`
installs, on the loop that serves the app, an exception handler that logs what the loop reports
(an exception raised in a callback, a task destroyed while pending) through ``loopgate.loop``, the
traceback as one field. A ``CancelledError`` is shutdown noise and logged at debug: the stream
server of asyncio (which Hypercorn uses) reports one for every connection task that ends cancelled,
as Hypercorn's connections still open at its graceful timeout do (CPython issue gh-113538; its fix,
python/cpython#113690, is not in the Python 3.11.7 this was seen on).

Under uvicorn and granian the access log is :class:`AccessLog`, an ASGI middleware writing the
same fields through ``loopgate.access``: uvicorn's own access line is written when the response
starts (no size, no duration) and holds the query string, granian's has no size and no request
id. Their own access logs are off in the production flags (service/server/commands.py); if one is turned
on, the formatter writes its lines without the query string too.

Credentials and message data are never passed to a logger. As a second line of defence the formatter
masks anything that looks like a bearer credential, a JWT or an ``access_token`` parameter.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import re
import ssl
import sys
import time
import traceback
from collections.abc import Awaitable, Coroutine, Mapping, MutableMapping
from typing import Any

from quart import Quart

from .request_ids import ASGIApp, Send, principal_var, request_id_in, request_id_var

_SECRETS = re.compile(
    r"(?i)(bearer\s+)\S+"
    r"|(access_token=)[^&\s\"']+"
    r"|eyJ[\w-]*\.[\w-]*\.[\w-]*"
    r"|\blg_[\w-]{16,}"
)

_loop_log = logging.getLogger("loopgate.loop")
_access_log = logging.getLogger("loopgate.access")

_HANDLER_MARK = "_loopgate_handler"
# Named fields a record may carry (``extra={FIELDS: {...}}``), written as they are in JSON.
FIELDS = "loopgate_fields"
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


_SERVER_ACCESS_LOGGERS = ("uvicorn.access", "granian.access")


def _server_access_fields(record: logging.LogRecord, entry: dict[str, Any]) -> None:
    """uvicorn's access record (its args: client, method, path with the query string, HTTP
    version, status) or granian's (a mapping of its atoms) as named fields, without the query
    string."""
    args = record.args
    if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
        remote, method, full_path, protocol, status = args
        path = str(full_path).partition("?")[0]
        entry.update(remote=remote, method=method, path=path, protocol=protocol, status=str(status))
    elif isinstance(args, Mapping) and "path" in args:
        atoms: Mapping[str, Any] = args
        path, method, status = atoms["path"], atoms.get("method"), atoms.get("status")
        entry.update(remote=atoms.get("addr"), method=method, path=path, status=str(status))
        entry.update(protocol=atoms.get("protocol"), duration_us=int(atoms.get("dt_ms", 0) * 1000))
    else:
        entry["message"] = redact(record.getMessage())
        return
    entry["message"] = f"{method} {path} {status}"
    request_id = request_id_var.get()
    if request_id:
        entry["request_id"] = request_id


# What every match of _SECRETS contains, in lower case: text holding none of them is returned as it
# is, without the regular expression (which an access line ran seven times, once per field).
_SECRET_MARKS = ("bearer", "access_token=", "eyj", "lg_")


def _mask(match: re.Match[str]) -> str:
    prefix = match.group(1) or match.group(2) or ""
    return prefix + "[redacted]"


def _has_secret_marks(text: str) -> bool:
    lowered = text.lower()
    return any(mark in lowered for mark in _SECRET_MARKS)


def redact(text: str) -> str:
    """``text`` with anything credential-like masked."""
    if not _has_secret_marks(text):
        return text
    return _SECRETS.sub(_mask, text)


# One encoder for every line: ``json.dumps`` with arguments makes a new one per call.
_ENCODER = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time, level, logger, message, request id, principal,
    and the exception if any. Hypercorn access records become named fields."""

    # The time of the last record, to the second, as text: lines of the same second share it.
    _second: tuple[int, str] = (-1, "")

    def _time(self, record: logging.LogRecord) -> str:
        """``record.created`` in ISO 8601, to the millisecond, in UTC (``+00:00``)."""
        created = record.created
        second = int(created)
        cached = self._second
        if cached[0] != second:
            text = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
            cached = self._second = (second, text)
        # The milliseconds from ``created`` too (not ``record.msecs``, which Python 3.13 takes
        # from the clock's nanoseconds: a float ``created`` rounded up to the next second would
        # then be written a second late).
        return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname,
            "logger": record.name,
        }
        if record.name == "hypercorn.access" and isinstance(record.args, Mapping):
            atoms = record.args
            for atom, name in _ACCESS_FIELDS.items():
                entry[name] = atoms[atom]
            entry["request_id"] = atoms["{x-request-id}o"]
            entry["message"] = f"{atoms['m']} {atoms['U']} {atoms['s']}"
        elif record.name in _SERVER_ACCESS_LOGGERS:
            _server_access_fields(record, entry)
        else:
            entry["message"] = redact(record.getMessage())
            request_id = getattr(record, "request_id", None) or request_id_var.get()
            if request_id:
                entry["request_id"] = request_id
            principal = principal_var.get()
            if principal:
                entry["principal"] = principal
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, Mapping):
            _add_fields(entry, fields)
        if record.exc_info:
            entry["exception"] = redact(self.formatException(record.exc_info))
        return _ENCODER.encode(entry)


def _add_fields(entry: dict[str, Any], fields: Mapping[str, Any]) -> None:
    """``fields`` added to ``entry`` (those it already has are kept), text values redacted."""
    texts = [value for value in fields.values() if isinstance(value, str)]
    # One look for credential-shaped text in all of them (an access line has seven): only a
    # line that holds some pays for a redaction of each value.
    clean = not _has_secret_marks("\0".join(texts))
    for name, value in fields.items():
        if not clean and isinstance(value, str):
            value = redact(value)
        entry.setdefault(name, value)


def configure_logging(fmt: str = "json", level: str = "INFO") -> None:
    """Send every logger's records to stderr, as JSON lines (``fmt="json"``) or plain text: the
    ``loopgate`` loggers at ``level``, the others (asyncio's, the Google clients', and Python's
    warnings, captured as ``py.warnings``) at their own levels, by default warnings and above.

    The handler is the root logger's: without one, records of loggers that have none (asyncio's)
    would reach stderr as plain text through logging's last-resort handler. Loggers that have
    their own and do not propagate (Hypercorn's, set in hypercorn.toml) are left to it.

    Idempotent: calling it again replaces the handler it installed before.
    """
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("loopgate").setLevel(level)
    logging.captureWarnings(True)
    google = logging.getLogger("google")
    if not google.handlers:
        # google-api-core stops the "google" loggers from propagating when its first client is
        # made, unless they were configured before: their records would then reach stderr as
        # plain text through logging's last-resort handler. A level configures them.
        google.propagate = True
        if google.level == logging.NOTSET:
            google.setLevel(logging.WARNING)


def log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An event loop exception handler (see ``loop.set_exception_handler``) that logs through
    ``loopgate.loop``: a ``CancelledError`` (shutdown noise) and a failed TLS handshake (the
    client's) at debug, anything else at error, with the exception's type and message and its
    traceback as the ``exception`` field. The context's other entries are fields of the line."""
    exception = context.get("exception")
    message = str(context.get("message") or "event loop error")
    fields = {
        name: value if isinstance(value, (str, int, float, bool)) else repr(value)
        for name, value in context.items()
        if name not in ("message", "exception", "source_traceback", "handle_traceback")
    }
    for name in ("source_traceback", "handle_traceback"):
        frames = context.get(name)
        if frames:
            fields[name] = "".join(traceback.format_list(frames))
    if isinstance(exception, BaseException):
        fields["error_type"] = type(exception).__name__
        message = f"{message}: {type(exception).__name__}"
        if str(exception):
            message += f": {exception}"
        quiet = isinstance(exception, (asyncio.CancelledError, ssl.SSLError))
        _loop_log.log(
            logging.DEBUG if quiet else logging.ERROR,
            "%s",
            message,
            exc_info=(type(exception), exception, exception.__traceback__),
            extra={FIELDS: fields},
        )
    else:
        _loop_log.error("%s", message, extra={FIELDS: fields})


def init_loop_logging(app: Quart) -> None:
    """Have the loop that serves ``app`` report through :func:`log_loop_exception`.

    Installed when serving starts, on the running loop, and kept after serving ends: the loop's
    last reports (connections and tasks ending after the app's shutdown) must be JSON too.
    """

    @app.before_serving
    async def install_loop_exception_handler() -> None:
        asyncio.get_running_loop().set_exception_handler(log_loop_exception)


class AccessLog:
    """ASGI middleware that writes one access line per request through ``loopgate.access``,
    with the fields of Hypercorn's (``remote``, ``method``, ``path`` without the query string,
    ``protocol``, ``status``, ``bytes``, ``duration_us``, ``request_id``).

    An HTTP request is logged once its response has been sent; a websocket once its handshake
    is answered (``101``, a refusal's status, or ``403`` for a close before the accept; its
    ``bytes`` are ``-``), so a stream's line does not wait for its end and its frames pass
    through a plain call.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        kind = scope["type"]
        if kind == "http" and _access_log.isEnabledFor(logging.INFO):
            return self._http(scope, receive, send)
        if kind == "websocket" and _access_log.isEnabledFor(logging.INFO):
            return self.app(scope, receive, _WebsocketAccess(scope, send))
        return self.app(scope, receive, send)

    async def _http(self, scope: Any, receive: Any, send: Send) -> None:
        start = time.perf_counter_ns()
        response: dict[str, Any] = {"status": 0, "bytes": 0, "request_id": None}

        async def logged_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                response["status"] = message["status"]
                response["request_id"] = request_id_in(message.get("headers", ()))
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            _log_access(scope, response["status"], response["bytes"], start, response["request_id"])


class _WebsocketAccess:
    """A websocket's ``send`` that logs the answer to its handshake, then only passes frames on."""

    __slots__ = ("_scope", "_send", "_start")

    def __init__(self, scope: Any, send: Send) -> None:
        self._scope: Any = scope
        self._send = send
        self._start = time.perf_counter_ns()

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        if self._scope is not None:
            kind = message["type"]
            if kind == "websocket.accept":
                self._done(101, message.get("headers", ()))
            elif kind == "websocket.http.response.start":  # a refusal, with its status
                self._done(message["status"], message.get("headers", ()))
            elif kind == "websocket.close":  # before the accept: the server answers 403
                self._done(403, ())
        return self._send(message)

    def _done(self, status: int, headers: Any) -> None:
        _log_access(self._scope, status, None, self._start, request_id_in(headers))
        self._scope = None  # logged: the rest are frames


def _log_access(
    scope: Any, status: int, size: int | None, start: int, request_id: str | None
) -> None:
    client = scope.get("client")
    remote = f"{client[0]}:{client[1]}" if client else None
    method = scope.get("method", "GET")
    path = scope.get("path", "")
    fields = {
        "remote": remote,
        "method": method,
        "path": path,
        "protocol": scope.get("http_version", "ws"),
        "status": str(status) if status else "-",
        "bytes": "-" if size is None else str(size),
        "duration_us": (time.perf_counter_ns() - start) // 1000,
        "request_id": request_id,
    }
    # The record made and handled directly (the level was checked by the caller): what
    # ``Logger.info`` adds on top, finding the caller's file and line by walking the stack, is
    # never written.
    record = _access_log.makeRecord(
        _access_log.name,
        logging.INFO,
        "",
        0,
        "%s %s %s",
        (method, path, fields["status"]),
        None,
        extra={FIELDS: fields, "request_id": request_id},
    )
    _access_log.handle(record)
