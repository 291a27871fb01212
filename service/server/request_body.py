"""Request bodies read from the ASGI receive channel as the handler consumes them.

Quart reads every request body into memory as fast as the client sends it, whatever the pace of
the handler (its receiver task appends each ``http.request`` message to ``request.body``). A
handler that forwards a large upload elsewhere needs the opposite: read a chunk only when the
previous one has been passed on, so that the server's own flow control (Hypercorn stops reading
the socket while its small per-request queue is full) slows the client down instead of memory
growing.

:class:`StreamingBodies` wraps the app's ASGI callable. For a request whose view is marked with
:func:`streams_body`, it keeps the receive channel for the handler, reachable as
:func:`request_stream`, and gives Quart a receive callable that only reports a disconnect; every
other request is passed through untouched::

    @blueprint.put("/upload")
    @streams_body
    async def upload() -> str:
        async for chunk in request_stream().chunks():
            ...

A request that Quart reads itself gets a lingering close too, when its body is large or chunked:
a handler that answers before the body has arrived (a ``413`` for a publish over the size limit,
a ``401``) would otherwise end the response with the rest of the body unread, and the server's
close then resets the connection under a client still sending, which may lose the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Literal, TypeVar, cast

from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)
from quart import Quart, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import RequestRedirect

from ..errors import BodyStalled, ClientDisconnected

SCOPE_KEY = "loopgate.request_stream"
# How long the rest of a body that the handler did not read is received and dropped once the
# response has ended (a "lingering close"); see _finishing.
LINGER_SECONDS = 10.0
_MARK = "_loopgate_streams_body"
BODYLESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE", "TRACE"})
# A declared body up to this size comes with its head or just after it: the server has it off
# the socket before any answer could end the response (no lingering close is needed), and Quart
# may read it before the handler runs (.quart_connections).
SMALL_BODY_BYTES = 64 * 1024

F = TypeVar("F", bound=Callable[..., Any])


def streams_body(view: F) -> F:
    """Mark a view whose handler reads the request body itself, through :func:`request_stream`."""
    setattr(view, _MARK, True)
    return view


def request_stream() -> RequestStream | None:
    """The current request's body stream; ``None`` when the request is not streamed."""
    stream = request.scope.get(SCOPE_KEY)
    return cast(RequestStream | None, stream)


class RequestStream:
    """The body of one request, received message by message when the handler asks for it."""

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self._released = asyncio.Event()
        self._started = False
        self.complete = False
        self.disconnected = False

    async def chunks(self, idle_timeout: float | None = None) -> AsyncIterator[bytes]:
        """Yield the body's chunks as they arrive; iterate once, from one task.

        Raises:
            ClientDisconnected: the client closed the connection before the body's end.
            BodyStalled: nothing arrived for ``idle_timeout`` seconds.
        """
        if self._started:
            raise RuntimeError("a request body can be read only once")
        self._started = True
        loop = asyncio.get_running_loop()
        try:
            # One timeout for the whole body, set again for each message (cheaper than a new one
            # each time) and off while the caller has the chunk.
            async with asyncio.timeout(None) as timeout:
                while not self.complete:
                    if idle_timeout is not None:
                        timeout.reschedule(loop.time() + idle_timeout)
                    message = await self._receive()
                    timeout.reschedule(None)
                    body = self._take(message)
                    if body:
                        yield body
        except TimeoutError:
            self._released.set()  # Quart may read the channel again: the rest is dropped
            assert idle_timeout is not None  # only a set timeout expires
            raise BodyStalled(idle_timeout) from None

    def _take(self, message: ASGIReceiveEvent) -> bytes:
        """The body bytes ``message`` carries; notes the body's end.

        Raises:
            ClientDisconnected: the message says the client went away.
        """
        if message["type"] == "http.disconnect":
            self.disconnected = True
            self._released.set()
            raise ClientDisconnected("the client disconnected during the upload")
        if message["type"] != "http.request":
            return b""
        if not message.get("more_body", False):
            self.complete = True
            self._released.set()
        return message.get("body", b"")

    async def receive_for_app(self) -> ASGIReceiveEvent:
        """Quart's view of the channel: nothing until the body is read, then the channel itself.

        A disconnect seen while reading the body is reported here too, so that Quart cancels the
        handler and everything it awaits.
        """
        await self._released.wait()
        if self.disconnected:
            return {"type": "http.disconnect"}
        return await self._receive()

    async def discard_rest(self) -> None:
        """Receive and drop what is left of the body."""
        while not (self.complete or self.disconnected):
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
            elif not message.get("more_body", False):
                self.complete = True


class ReceivedBody:
    """The receive channel of a request whose body Quart reads, noting when that body ends.

    Quart keeps reading the channel until the client disconnects, for as long as the handler's
    task runs, and so while the response is being sent: :meth:`discard_rest` waits for its
    reading to reach the body's end (it drops what it reads past a refused body's limit).
    """

    def __init__(self, receive: ASGIReceiveCallable) -> None:
        self._receive = receive
        self._ended = asyncio.Event()
        self.complete = False
        self.disconnected = False

    async def receive(self) -> ASGIReceiveEvent:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.disconnected = True
            self._ended.set()
        elif message["type"] == "http.request" and not message.get("more_body", False):
            self.complete = True
            self._ended.set()
        return message

    async def discard_rest(self) -> None:
        """Wait until the body has been read to its end, or the client has gone."""
        await self._ended.wait()


def body_size(scope: Any) -> Literal["none", "small", "large"]:
    """How large a body the request declares: ``"small"`` for a ``Content-Length`` of at most
    :data:`SMALL_BODY_BYTES`, ``"large"`` for a larger one, a chunked one or a length that cannot
    be read, ``"none"`` when it declares neither."""
    for name, value in scope["headers"]:
        name = name.lower()
        if name == b"content-length":
            try:  # the framing guard, outside, refuses all but digits (``5, 5`` is one length)
                return "small" if int(value.split(b",")[0]) <= SMALL_BODY_BYTES else "large"
            except ValueError:
                return "large"
        if name == b"transfer-encoding":
            return "large"
    return "none"


class StreamingBodies:
    """ASGI middleware giving views marked with :func:`streams_body` their raw request body, and
    other requests with a large body a lingering close."""

    def __init__(self, app: Quart, asgi_app: Callable[..., Any]) -> None:
        self.app = app
        self.asgi_app = asgi_app
        self._methods: frozenset[str] | None = None

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        # A plain function handing back the app's coroutine: a coroutine of its own would stay
        # alive, with its frame, for as long as each connection (websockets included).
        result: Coroutine[Any, Any, None]
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            result = self.asgi_app(scope, receive, send)
        elif self._streams(scope):
            stream = RequestStream(receive)
            scope = cast(Scope, {**scope, SCOPE_KEY: stream})
            result = self.asgi_app(scope, stream.receive_for_app, _finishing(stream, send))
        elif body_size(scope) == "large":
            body = ReceivedBody(receive)
            result = self.asgi_app(scope, body.receive, _finishing(body, send))
        else:
            result = self.asgi_app(scope, receive, send)
        return result

    def _streams(self, scope: Any) -> bool:
        method = scope["method"]
        if method not in self._streamed_methods():
            return False  # most requests stop here, without a second routing of their path
        adapter = self.app.url_map.bind("localhost", scope.get("root_path", "") or "/")
        try:
            endpoint, _ = adapter.match(scope["path"], method=method)
        except (HTTPException, RequestRedirect):
            return False
        view = self.app.view_functions.get(str(endpoint))
        return bool(getattr(view, _MARK, False))

    def _streamed_methods(self) -> frozenset[str]:
        """The methods of the marked views' routes (the routes are all known once serving)."""
        if self._methods is None:
            methods: set[str] = set()
            for rule in self.app.url_map.iter_rules():
                if getattr(self.app.view_functions.get(rule.endpoint), _MARK, False):
                    methods.update(rule.methods or ())
            self._methods = frozenset(methods - BODYLESS)
        return self._methods


def _finishing(stream: RequestStream | ReceivedBody, send: ASGISendCallable) -> ASGISendCallable:
    """``send``, receiving and dropping what is left of an unread body before the response ends.

    A handler that answers without reading the whole body (a refused upload) leaves the rest to
    come. Closing the connection then would reset it under a client still sending, which may
    lose the answer; and ending the response with Hypercorn's small receive queue full makes it
    wait forever to queue a disconnect event, holding the connection and the handler's last
    ``send`` until the client goes away. So the rest of the body is received and dropped for up
    to ``LINGER_SECONDS`` (the answer itself is already sent), then the response ends, with the
    draining going on until Hypercorn has finished with the connection.
    """

    async def drain_for(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stream.discard_rest()

    async def send_and_drain(message: ASGISendEvent) -> None:
        if stream.disconnected:
            # The client is gone: nothing reaches it. When Hypercorn's graceful timeout ended the
            # connection it has already answered and closed the stream, and a send would raise.
            return
        ending = message["type"] == "http.response.body" and not message.get("more_body", False)
        if not ending or stream.complete or stream.disconnected:
            await send(message)
            return
        body = cast(bytes, message.get("body", b""))
        if body:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await drain_for(LINGER_SECONDS)
        if stream.complete or stream.disconnected:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        drain = asyncio.ensure_future(drain_for(LINGER_SECONDS))
        try:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            await asyncio.shield(drain)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    return send_and_drain


def install(app: Quart) -> None:
    """Wrap ``app``'s ASGI callable once."""
    if not isinstance(app.asgi_app, StreamingBodies):
        app.asgi_app = StreamingBodies(app, app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware, as Quart documents it
