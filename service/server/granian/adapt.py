"""What loopgate changes in Granian: nothing in the process; its limits are flags.

Granian's HTTP and websockets run in Rust (hyper, tungstenite), out of reach of Python, so its
limits are the production flags of service/server/commands.py:

* the request head: ``--http1-buffer-size 16384`` (hyper answers 431 above it, and above 100
  headers) and ``--http2-max-headers-size 16384``;
* idle connections: ``--http1-header-read-timeout`` (at most 60 s) closes a keep-alive
  connection whose next head does not come, and a head sent too slowly;
* connections served at once: ``--backpressure``, above the stream gate's own bound;
* request bodies are read as the app asks for them (an upload over its limit is refused before
  its body is sent); the publish body limit is Quart's, as under every server.

What Granian does not offer, and the tests mark as such: a websocket message limit of its own
(tungstenite's 64 MiB a message applies, so a large message is read whole before anyone can
refuse it), websocket compression (never negotiated, whatever ``LOOPGATE_STREAM_COMPRESSION``
says), and a timeout for a connection that never sends a byte. Its own access log has no size
and no request id: loopgate writes the access log instead (:class:`service.logs.AccessLog`).

:class:`WholeRefusals` is what loopgate adds, at the ASGI level, for every websocket:

* Granian takes a refused handshake's body (ASGI's denial response, added in
  emmett-framework/granian#771) in one message only, raising "Unsupported ASGI message" at a
  second; Quart sends it in several, so the client got 403 instead of the refusal's 401, 403 or
  429. The body is sent in one message.
* A message over :data:`MAX_MESSAGE` (the limit of the other servers' flags) closes the
  websocket with 1009 before the app sees it, as under the other servers; Granian has already
  read it whole, and a client that goes on sending is reset and may not read the close.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import Any

from quart import Quart

from ...config import Settings
from ...logs import AccessLog

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]

MAX_MESSAGE = 262144  # bytes (or characters) of one websocket message


def install(app: Quart, settings: Settings) -> None:
    """Adapt Granian: nothing in the process; ``app`` gets :class:`WholeRefusals` and loopgate's
    access log (Granian's has no size nor request id)."""
    del settings
    if not isinstance(app.asgi_app, WholeRefusals):
        app.asgi_app = WholeRefusals(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware
    if not isinstance(app.asgi_app, AccessLog):
        app.asgi_app = AccessLog(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware


class WholeRefusals:
    """ASGI middleware: a refused websocket handshake's body reaches Granian in one message, and
    a websocket message over :data:`MAX_MESSAGE` closes its connection with 1009."""

    def __init__(self, app: Callable[[Any, Any, Any], Coroutine[Any, Any, None]]) -> None:
        self.app = app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        if scope["type"] == "websocket":
            send = _OneBody(send)
            receive = _Limited(receive, send)
        return self.app(scope, receive, send)


class _Limited:
    """A websocket's ``receive`` that closes with 1009 instead of handing over a message over
    :data:`MAX_MESSAGE`; the app then receives its ``websocket.disconnect``."""

    __slots__ = ("_closed", "_receive", "_send")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self._closed = False

    async def __call__(self) -> MutableMapping[str, Any]:
        if self._closed:
            return {"type": "websocket.disconnect", "code": 1009}
        message = await self._receive()
        if message["type"] == "websocket.receive":
            data = message.get("text") or message.get("bytes") or ""
            if len(data) > MAX_MESSAGE:
                self._closed = True
                await self._send({"type": "websocket.close", "code": 1009})
                return {"type": "websocket.disconnect", "code": 1009}
        return message


class _OneBody:
    """A websocket's ``send`` that joins a refusal's body; every other message passes on."""

    __slots__ = ("_parts", "_send")

    def __init__(self, send: Send) -> None:
        self._send = send
        self._parts: list[bytes] = []

    def __call__(self, message: MutableMapping[str, Any]) -> Awaitable[None]:
        if message["type"] != "websocket.http.response.body":
            return self._send(message)
        self._parts.append(bytes(message.get("body", b"")))
        if message.get("more_body", False):
            return _done()
        body, self._parts = b"".join(self._parts), []
        return self._send({"type": "websocket.http.response.body", "body": body})


async def _done() -> None:
    pass
