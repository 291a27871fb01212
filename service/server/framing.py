"""Requests whose body framing is ambiguous are refused, and their connection closed (RFC 9112 §6).

A request with both ``Content-Length`` and ``Transfer-Encoding`` is a request smuggling vector: a
proxy in front that frames the body by ``Content-Length`` forwards, inside that body, a second
request that a server framing it as chunked then serves on the same connection. RFC 9112 §6.1
lets a server read such a request by its ``Transfer-Encoding``, but only if it closes the
connection after answering. h11, and so Hypercorn, reads it as chunked and keeps the connection
open, so the hidden request is served (h11 issue python-hyper/h11#90, Hypercorn issue
pgjones/hypercorn#279, both open). Servers differ in what they let through, so the check is an
ASGI middleware over the raw headers of the scope, the same under any server.

:class:`FramingGuard` answers ``400 INVALID_ARGUMENT`` with ``Connection: close``, before the app
sees the request and without reading its body, when

* ``Content-Length`` and ``Transfer-Encoding`` are both present (§6.1, §6.3 rule 3);
* ``Content-Length`` is not a single decimal number, or is repeated with different values
  (§6.3 rule 5; ``Content-Length: 5, 5`` is one length);
* the last transfer coding is not ``chunked``, or ``chunked`` is applied more than once
  (§6.3 rule 4: the body's length cannot be known);
* an HTTP/1.0 request has a ``Transfer-Encoding`` (§6.1: its framing is faulty);

and ``501 UNIMPLEMENTED`` when ``chunked`` is preceded by another transfer coding (§6.1), which
the service cannot decode. Under Hypercorn, h11 already refuses bad or differing lengths and every
``Transfer-Encoding`` but a single ``chunked`` itself (with an empty body); this guard adds the
first and the HTTP/1.0 cases, and holds the same rules under servers that let more through.

A response with ``Connection: close`` ends the connection once it is sent (Hypercorn, uvicorn);
whatever followed the refused request on it is never read as a request. HTTP/2 and HTTP/3 have no
``Connection`` header (their framing is the server's): the refusal is then answered without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from quart import Quart

from ..errors import error_body
from .request_body import LINGER_SECONDS

log = logging.getLogger("loopgate.server")

_DIGITS = re.compile(rb"[0-9]+")


class FramingError(Exception):
    """The body framing of a request is ambiguous or unsupported."""

    def __init__(self, message: str, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def check_framing(http_version: str, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Check the body framing of a request with the raw ``headers`` of its ASGI scope.

    Raises:
        FramingError: the request's body length cannot be known for certain, or it uses a
            transfer coding other than ``chunked``.
    """
    lengths: list[bytes] = []
    codings: list[bytes] = []
    has_transfer_encoding = False
    for name, value in headers:
        name = name.lower()
        if name == b"content-length":
            lengths += [item.strip() for item in value.split(b",")]
        elif name == b"transfer-encoding":
            has_transfer_encoding = True
            codings += [item.strip().lower() for item in value.split(b",") if item.strip()]
    if has_transfer_encoding:
        if lengths:
            raise FramingError("a request may not have both Content-Length and Transfer-Encoding")
        if http_version == "1.0":
            raise FramingError("an HTTP/1.0 request may not have a Transfer-Encoding")
        if not codings or codings[-1] != b"chunked" or codings.count(b"chunked") > 1:
            raise FramingError("Transfer-Encoding must end with a single chunked coding")
        if len(codings) > 1:
            raise FramingError("only the chunked transfer coding is supported", 501)
    elif lengths:
        if not all(_DIGITS.fullmatch(length) for length in lengths):
            raise FramingError("Content-Length must be a decimal number of bytes")
        if len({int(length) for length in lengths}) > 1:
            raise FramingError("a request may not have differing Content-Length values")


class FramingGuard:
    """ASGI middleware refusing HTTP requests whose body framing :func:`check_framing` rejects.

    Websocket and lifespan scopes pass through untouched.
    """

    def __init__(self, asgi_app: Callable[..., Any]) -> None:
        self.asgi_app = asgi_app

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        # A plain function handing back a coroutine: no frame of its own per connection.
        if scope["type"] == "http":
            try:
                check_framing(scope["http_version"], scope["headers"])
            except FramingError as error:
                return _refuse(scope, receive, send, error)
        result: Coroutine[Any, Any, None] = self.asgi_app(scope, receive, send)
        return result


async def _refuse(
    scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, error: FramingError
) -> None:
    log.info("refused %s %s: %s", scope["method"], scope["path"], error.message)
    body = json.dumps(error_body(error.status_code, error.message)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if scope["http_version"] in ("1.0", "1.1"):
        headers.append((b"connection", b"close"))
    # The body is never given to the app: it is received and dropped while answering, and the
    # response ends once the body has (for up to LINGER_SECONDS), a lingering close. Closing with
    # the body unread would reset the connection under a client still sending, which may lose
    # the answer; and Hypercorn queues the end of the request once the response ends, so with its
    # small per-request queue full of unread body it would wait for that forever.
    discard = asyncio.ensure_future(_discard(receive))
    try:
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": True})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(discard), LINGER_SECONDS)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        discard.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await discard


async def _discard(receive: ASGIReceiveCallable) -> None:
    """Receive and drop the request's body, to its end or the client's going."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return


def install(app: Quart) -> None:
    """Wrap ``app``'s ASGI callable once. Install it after every other wrapper, so that it
    sees each request first."""
    if not isinstance(app.asgi_app, FramingGuard):
        app.asgi_app = FramingGuard(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware, as Quart documents it


__all__ = ["FramingError", "FramingGuard", "check_framing", "install"]
