"""Quart's ASGI connection classes, adapted: request tasks that end with their connection, small
bodies read without tasks of their own, a request that works out its blueprints once, a lighter
websocket inbox, and each websocket's raw ASGI ``send`` for the stream routes.

These subclass Quart's ``ASGIHTTPConnection`` and ``ASGIWebsocketConnection`` and replace
internals of theirs (``__call__``, the ``queue`` attribute); ``tests/test_server_internals.py``
checks each against the installed Quart, within the versions ``pyproject.toml`` allows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable
from quart import Quart
from quart.asgi import ASGIHTTPConnection, ASGIWebsocketConnection
from quart.utils import cancel_tasks, raise_task_exceptions
from quart.wrappers import Request as QuartRequest
from werkzeug.sansio.utils import get_content_length
from werkzeug.utils import cached_property

from .request_body import BODYLESS, body_size
from .request_body import SCOPE_KEY as STREAM_KEY


class HTTPConnection(ASGIHTTPConnection):
    """Quart's HTTP connection, whose request tasks end when the server cancels it, and which
    serves a request with a small declared body without tasks of its own.

    Quart runs a request's handler and its body receiver as tasks of their own and waits for the
    first to finish. When the server cancels that wait (Hypercorn does at its graceful timeout,
    e.g. for an upload whose client stalls), Quart leaves both tasks running: into the app's
    shutdown, over clients already closed, answering on a stream already closed. Here they are
    cancelled with the connection.

    In a tight loop of small publishes through the app (``bench.profile_publish --in-process
    --micro``), a publish took 20-27% less CPU without them. A body of at most
    :data:`~.request_body.SMALL_BODY_BYTES`, declared by its ``Content-Length``, has come with its head or
    just after it: it is read first, within the request's body timeout, and the handler then
    runs in this task. What such a handler no longer gets is a cancellation when
    its client goes away mid-request; its answer is dropped instead, as it would be had the
    client left a moment later. A body that does not come in time is left to Quart's own way,
    which answers 408.
    """

    async def __call__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        request = self._create_request_from_scope(send)
        if _small_body(self.scope):
            match await _read_body(request, receive):
                case True:
                    await self.handle_request(request, send)
                    return
                case None:
                    return  # the client went away before its body came
        await self.serve_with_tasks(request, receive, send)

    async def serve_with_tasks(
        self, request: Any, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Quart's way: the handler and the body's receiver as tasks, cancelled with the
        connection."""
        receiver = asyncio.ensure_future(self.handle_messages(request, receive))
        handler = asyncio.ensure_future(self.handle_request(request, send))
        try:
            done, pending = await asyncio.wait(
                [handler, receiver], return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            handler.cancel()
            receiver.cancel()
            await asyncio.gather(handler, receiver, return_exceptions=True)
            raise
        await cancel_tasks(pending)
        raise_task_exceptions(done)


def _small_body(scope: Any) -> bool:
    """Whether the request declares a body of at most :data:`~.request_body.SMALL_BODY_BYTES`, for Quart to
    read (not one that its handler streams, :mod:`.request_body`)."""
    if scope["method"] in BODYLESS or STREAM_KEY in scope:
        return False
    return body_size(scope) == "small"


async def _read_body(request: Any, receive: ASGIReceiveCallable) -> bool | None:
    """Read the request's body into ``request.body``, as Quart's receiver would: ``True`` once it
    is whole, ``None`` when the client has gone, ``False`` when it did not come within the body
    timeout (what came is kept; the timeout then counts as spent)."""
    body = request.body
    try:
        async with asyncio.timeout(request.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.request":
                    body.append(message.get("body", b""))
                    if not message.get("more_body", False):
                        body.set_complete()
                        # The body is whole: awaiting it cannot take time, and a timeout on it
                        # would only set and clear a timer.
                        request.body_timeout = None
                        return True
                elif message["type"] == "http.disconnect":
                    return None
    except TimeoutError:
        request.body_timeout = 0
        return False


class Request(QuartRequest):
    """Quart's request, whose ``blueprints`` are worked out once for its matched rule, and whose
    ``content_length`` is read without an exception.

    Quart computes the blueprints anew each time they are asked for, several times per request
    (for the before and after hooks, the error handlers, the teardown), about 2% of a publish.
    werkzeug's ``content_length``, which Quart reads for every request, looks ``Transfer-Encoding``
    up with ``headers.get``: missing, as it is from almost every request, it costs a
    ``BadRequestKeyError`` made and caught, about 1% of a publish.
    """

    @cached_property
    def content_length(self) -> int | None:
        length = transfer = None
        for name, value in self.headers:
            lowered = name.lower()
            if lowered == "content-length":
                length = value if length is None else length
            elif lowered == "transfer-encoding":
                transfer = value if transfer is None else transfer
        return get_content_length(length, transfer)

    _blueprints_of: Any = None  # the rule the cached blueprints belong to
    _blueprints: list[str] | None = None

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        if self._blueprints is None or rule is not self._blueprints_of:
            self._blueprints_of = rule
            self._blueprints = super().blueprints
        return self._blueprints


class ExposeWebsocketSend:
    """ASGI middleware putting each websocket's ASGI ``send`` in its scope (``WEBSOCKET_SEND_KEY``).

    The stream routes write their frames with it: Quart's ``websocket.send`` yields to the loop,
    re-checks the handshake and emits a signal on every frame, which costs as much as the rest of
    the write.
    """

    def __init__(self, asgi_app: Callable[..., Any]) -> None:
        self.asgi_app = asgi_app

    def __call__(self, scope: Any, receive: Any, send: Any) -> Coroutine[Any, Any, None]:
        # Not a coroutine of its own and no copy of the scope: either would hold about 1 KiB per
        # connection for its whole life.
        if scope["type"] == "websocket":
            scope[WEBSOCKET_SEND_KEY] = send
        result: Coroutine[Any, Any, None] = self.asgi_app(scope, receive, send)
        return result


WEBSOCKET_SEND_KEY = "loopgate.websocket_send"


class _Inbox:
    """The frames a websocket client sent, for ``websocket.receive()``: what Quart uses of an
    ``asyncio.Queue``, in a list and at most one future. An ``asyncio.Queue`` holds three deques,
    2.2 KiB for every connection, most of which never receive anything."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            except asyncio.CancelledError:
                # Receivers share the future: another one's cancellation cancels it too.
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise
        return self._items.pop(0)


class WebsocketConnection(ASGIWebsocketConnection):
    """Quart's websocket connection with a lighter inbox (:class:`_Inbox`)."""

    def __init__(self, app: Quart, scope: Any) -> None:
        super().__init__(app, scope)
        self.queue: Any = _Inbox()
