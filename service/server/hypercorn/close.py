"""At shutdown, connections whose clients read nothing are reset, so that a worker always exits.

Hypercorn (asyncio workers) cancels the connections still open at its graceful timeout and
waits for them to end. A connection ends by sending what it still has to send (a websocket's
close frame, the rest of a response) and by flushing its transport, in ``finally`` blocks where
the cancellation has already been spent. A client that reads nothing (a websocket or SSE
subscriber, or a download, whose receive window stays shut) never lets those sends finish, and the
worker waits forever. Measured here: one websocket subscriber that read nothing kept a worker with
a 2 s graceful timeout running until it was killed 30 s later.

:func:`bound_close` notes the task of every connection Hypercorn serves (no extra task or frame
per connection). Once the worker is shutting down, a watcher looks at them four times a second,
and resets a connection (aborts its transport, dropping what it still holds) that is still there
``FLUSH_SECONDS`` after Hypercorn cancelled it. The pending sends then fail, and the connection
ends as one whose client went away.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Generator
from typing import Any

log = logging.getLogger("loopgate.server")

FLUSH_SECONDS = 3.0
POLL_SECONDS = 0.25
_MARK = "_loopgate_bounded"

# Hypercorn's connection objects (TCPServer) and the task serving each. Weak both ways: a task
# that ended with an error keeps, through its traceback, a reference to its connection.
_connections: weakref.WeakKeyDictionary[Any, weakref.ref[asyncio.Task[Any]]] = (
    weakref.WeakKeyDictionary()
)
_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[None]] = (
    weakref.WeakKeyDictionary()
)


def bound_close(seconds: float = FLUSH_SECONDS) -> None:
    """Reset, at shutdown, the connections of Hypercorn's asyncio workers that are still open
    ``seconds`` after Hypercorn cancelled them (once per process)."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
    except ImportError:  # served by another ASGI server
        return
    original: Callable[[Any], Generator[Any]] | None = getattr(TCPServer, "__await__", None)
    if original is None or not hasattr(TCPServer, "run"):
        log.warning("this Hypercorn serves connections in a way loopgate cannot bound")
        return
    if getattr(original, _MARK, False):
        return

    def __await__(self: Any) -> Generator[Any]:
        task = asyncio.current_task()
        context = getattr(self, "context", None)
        if task is not None and hasattr(getattr(context, "terminated", None), "wait"):
            _connections[self] = weakref.ref(task)
            _watch(task.get_loop(), context, seconds)
        return original(self)

    setattr(__await__, _MARK, True)
    TCPServer.__await__ = __await__  # type: ignore[method-assign]  # the one patch of Hypercorn here


def _watch(loop: asyncio.AbstractEventLoop, context: Any, seconds: float) -> None:
    if loop not in _watchers:
        _watchers[loop] = loop.create_task(_reset_stuck(loop, context, seconds))


async def _reset_stuck(loop: asyncio.AbstractEventLoop, context: Any, seconds: float) -> None:
    await context.terminated.wait()  # Hypercorn's own "the worker is shutting down"
    cancelled_at: dict[int, float] = {}
    reset: set[int] = set()
    while True:
        now = loop.time()
        serving = [
            (connection, task)
            for connection, ref in list(_connections.items())
            if (task := ref()) is not None and task.get_loop() is loop and not task.done()
        ]
        if not serving:
            return
        for connection, task in serving:
            if not task.cancelling():
                continue
            since = cancelled_at.setdefault(id(connection), now)
            if now - since >= seconds and id(connection) not in reset:
                reset.add(id(connection))
                log.info(
                    "a client took nothing for %g s after its connection ended: reset", seconds
                )
                connection.writer.transport.abort()
        await asyncio.sleep(POLL_SECONDS)


__all__ = ["FLUSH_SECONDS", "bound_close"]
