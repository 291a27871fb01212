"""What loopgate changes in uvicorn: its fast HTTP/1.1 protocol, given by ``--http``.

uvicorn's httptools protocol (``--http httptools``) lacks three of the limits loopgate keeps under
Hypercorn:

* **a bound on the request head.** llhttp, under httptools, has no settable limit, and uvicorn
  adds none (``--h11-max-incomplete-event-size`` is for h11 only): a 100 KB header block is
  served, and a head that never ends is buffered as it comes (uvicorn issue Kludex/uvicorn#157,
  httptools issue MagicStack/httptools#87);
* **a deadline for the head.** uvicorn arms its keep-alive timer only after a response, and every
  byte received disarms it: a connection that sends nothing, or its head a byte at a time, is
  held for ever (Kludex/uvicorn#160);
* **websocket compression by setting.** ``--ws-per-message-deflate`` is one switch for the
  process, not ``LOOPGATE_STREAM_COMPRESSION``.

:class:`HttpToolsProtocol` is uvicorn's, with those added, and ``--http
service.server.uvicorn.adapt:HttpToolsProtocol`` (uvicorn takes an import string there) is in
the production flags (service/server/commands.py). A head larger than ``--h11-max-incomplete-event-size``
(16 KiB) is answered 431 and its connection closed; a head must be complete within
``--timeout-keep-alive`` of the connection's start or of the previous response's end, however
slowly it comes; the ``Sec-WebSocket-Extensions`` offer is dropped before the websocket
handshake unless :func:`install` was told compression is on, so the websocket protocol
negotiates none (``--ws-per-message-deflate true`` lets it negotiate when it is on). A request
uvicorn cannot parse (ambiguous framing among them) is answered with loopgate's JSON 400 instead
of uvicorn's plain text, and a refused connection's side is shut first and what the client still
sends dropped for :data:`LINGER` seconds: closing at once with its data unread resets the
connection, and the client may lose the answer.

The same holds for a websocket whose client sent a message over ``--ws-max-size``: uvicorn's
websockets protocol sends its 1009 and closes at once (and again when the app's handler ends), so
a client still sending was reset before it could read the close frame, and the app's next send
raised an error that was logged as the app's. :class:`WebSocketsSansIOProtocol` (``--ws
service.server.uvicorn.adapt:WebSocketsSansIOProtocol``) shuts its side after the 1009, drops
what the client still sends, closes after :data:`LINGER` seconds at most, and drops what the app
sends after it (the app has its ``websocket.disconnect``).

It reaches into uvicorn's protocol class (its parser callbacks, ``data_received``,
``send_400_response``, ``on_response_complete`` and the ``headers`` it hands the websocket
protocol): :data:`SUPPORTED` names the uvicorn versions it was checked against. With another
version, or a class of another shape, it logs a warning and :class:`HttpToolsProtocol` is
uvicorn's own, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import uvicorn
from quart import Quart
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.websockets import websockets_sansio_impl

from ...config import Settings
from ...errors import error_body
from ...logs import AccessLog

log = logging.getLogger("loopgate.server")

SUPPORTED = ((0, 54), (0, 55))  # uvicorn versions checked: from, up to (excluded)
HEAD_LIMIT = 16384  # bytes, when --h11-max-incomplete-event-size is not given
_EXPECTED = (
    "data_received",
    "on_message_begin",
    "on_header",
    "on_headers_complete",
    "on_response_complete",
    "send_400_response",
    "connection_lost",
)
_EXTENSIONS = b"sec-websocket-extensions"
LINGER = 2.0  # seconds a refused connection's further data is read and dropped before closing


def _refusal(status: bytes, body: dict[str, Any]) -> bytes:
    content = json.dumps(body).encode()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status, len(content), content)
    )


_TOO_LARGE = _refusal(
    b"431 Request Header Fields Too Large",
    error_body(431, "the request head is too large", "REQUEST_HEADER_FIELDS_TOO_LARGE"),
)
_INVALID = _refusal(
    b"400 Bad Request", error_body(400, "invalid HTTP request (its framing or its head)")
)

_compression = False


def install(app: Quart, settings: Settings) -> None:
    """Adapt uvicorn (once per process, however often it is called): websocket compression is
    offered to the websocket protocol only when ``settings.stream_compression`` is on, and
    loopgate writes the access log (uvicorn's has no size nor duration, and has the query string).
    """
    global _compression
    _compression = settings.stream_compression
    if not isinstance(app.asgi_app, AccessLog):
        app.asgi_app = AccessLog(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware


def _uvicorn_version() -> tuple[int, ...]:
    return tuple(int(part) for part in uvicorn.__version__.split(".")[:2] if part.isdigit())


def shape_fits() -> bool:
    """Whether uvicorn's httptools protocol is one loopgate's additions fit (logs when not)."""
    version = _uvicorn_version()
    fits = (
        SUPPORTED[0] <= version < SUPPORTED[1]
        and all(
            callable(getattr(httptools_impl.HttpToolsProtocol, name, None)) for name in _EXPECTED
        )
        and all(
            callable(getattr(websockets_sansio_impl.WebSocketsSansIOProtocol, name, None))
            for name in ("data_received", "handle_parser_exception", "send")
        )
    )
    if not fits:
        log.warning(
            "uvicorn %s is not one loopgate adapts (%s to %s): its request heads are not "
            "bounded nor timed, and websocket compression follows --ws-per-message-deflate",
            uvicorn.__version__,
            ".".join(map(str, SUPPORTED[0])),
            ".".join(map(str, SUPPORTED[1])),
        )
    return fits


FITS = shape_fits()


class HttpToolsProtocol(httptools_impl.HttpToolsProtocol):
    """uvicorn's httptools protocol with a bounded, timed request head, and websocket
    compression offered only when loopgate's setting allows it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        configured = getattr(self.config, "h11_max_incomplete_event_size", None)
        self._head_limit: int = configured or HEAD_LIMIT
        self._head_open = True  # until the current request's head is parsed
        self._head_began = False  # a head began during the feed in progress
        self._head_bytes = 0  # of the open head, counted by the chunks that carried only it
        self._head_size = 0  # of the open head, counted by what the parser handed over
        self._head_too_large = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what a refused client still sends is dropped, until it closes
        self._head_began = False
        super().data_received(data)
        if not self._head_open or self.transport.is_closing():
            return
        # A head still open after this chunk holds all of it, unless the head began in it (it may
        # then end a request before): those chunks are not counted, so the bound can be a chunk
        # late for a head that is still coming, never early. A complete head is bounded exactly
        # by on_headers_complete.
        if not self._head_began:
            self._head_bytes += len(data)
        if self._head_bytes > self._head_limit:
            self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_open = True
        self._head_began = True
        self._head_bytes = 0
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        if not _compression and name.lower() == _EXTENSIONS:
            return  # the websocket protocol sees no offer and negotiates no compression
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._head_open = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._head_open_or_idle():
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer is plain text, and it closes at once (see _refuse); the client's
        # end of the connection closes it too (eof_received returns None).
        del msg
        self._refuse(_TOO_LARGE if self._head_too_large else _INVALID)

    def _count(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self._head_limit:
            self._head_too_large = True
            raise ValueError("request head too large")  # httptools stops parsing

    def _refuse_head(self) -> None:
        self._refuse(_TOO_LARGE)

    def _refuse(self, response: bytes) -> None:
        """Answer ``response`` and end the connection. Closing at once, with the client's
        data unread, would reset the connection, and the client could lose the answer: the
        server's side is shut, what the client still sends is dropped, and the connection
        closes when the client closes it or after :data:`LINGER` seconds."""
        self._head_too_large = False
        self._head_open = False
        self._disarm_head_timer()
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self.transport.write(response)
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _head_open_or_idle(self) -> bool:
        cycle = self.cycle
        return self._head_open or cycle is None or bool(cycle.response_complete)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_open_or_idle() and not self.transport.is_closing():
            self.transport.close()


class WebSocketsSansIOProtocol(websockets_sansio_impl.WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, whose close after a protocol error (1009 for a message
    over the limit) the client can read."""

    _lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # after the close: dropped, neither parsed nor kept
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        if not self.transport.can_write_eof():
            super().handle_parser_exception()
            return
        # uvicorn's, with its side shut instead of the connection closed; the close timer keeps
        # the end of the app's handler from closing the connection at once.
        assert self.conn.close_sent is not None
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self._lingering = True
        self.transport.write_eof()
        self.close_timer = self.loop.call_later(LINGER, self.transport.close)

    async def send(self, message: Any) -> None:
        if self._lingering:
            # Dropped, as Hypercorn drops what is sent after a close: the app learns of the end
            # from its websocket.disconnect, instead of an error from its next send.
            return
        await super().send(message)


if not FITS:
    HttpToolsProtocol = httptools_impl.HttpToolsProtocol  # type: ignore[assignment,misc]  # uvicorn's own
    WebSocketsSansIOProtocol = websockets_sansio_impl.WebSocketsSansIOProtocol  # type: ignore[assignment,misc]
