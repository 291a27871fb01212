"""A connection its client has closed is closed once it is idle, not at the keep-alive timeout.

Hypercorn (asyncio workers, 0.18) serves each connection in a task group that also holds the
connection's keep-alive timer, which runs while no request is in flight. When the client closes its
side (FIN), the read loop ends, but the task group still waits for that timer: the socket stays in
CLOSE-WAIT, its file descriptor held, for ``keep_alive_timeout`` (75 s in hypercorn.toml) after the
connection went idle. Measured on loopback with the repository's hypercorn.toml, for the service
and for a bare ASGI app alike (``asyncio`` and ``uvloop`` workers), 75 s each for: a connection
that never sent a request; a keep-alive client that closes after its answer; a client that sends
its request and closes its side at once (``printf ... | nc -N``), which still gets its answer,
after which the connection goes idle with the timer running again. A client that resets stopped
holding a descriptor at once (the transport closes on the reset) but, by Hypercorn's code, left its
connection's task waiting for the timer. Connections closed while a request was in flight (a
partial request or body, an SSE stream, a websocket without a close frame) were closed at once:
Hypercorn tells the app the client disconnected and closes when the request ends.

:func:`close_when_read_ends` wraps ``TCPServer._read_data``: when the read loop ends, a running
keep-alive timer is stopped, so the task group ends and Hypercorn closes the connection as after
any other disconnect; and the connection's timer is made to close it at once, so a connection
whose request was still in flight is closed when that request ends, where it would go idle. No
setting does this: ``read_timeout`` would cut off subscribers and slow downloads, and a shorter
``keep_alive_timeout`` still leaves each socket for its full length.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("loopgate.server")

_MARK = "_loopgate_close_when_read_ends"


def close_when_read_ends() -> None:
    """Close Hypercorn's idle connections as soon as their client closes them (once per
    process; Hypercorn's asyncio workers only)."""
    try:
        from hypercorn.asyncio.tcp_server import TCPServer
        from hypercorn.asyncio.worker_context import AsyncioSingleTask
    except ImportError:  # served by another ASGI server
        return
    original: Callable[[Any], Coroutine[Any, Any, None]] | None = getattr(
        TCPServer, "_read_data", None
    )
    if original is None or getattr(original, _MARK, False):
        return
    if not (
        inspect.iscoroutinefunction(original)
        and inspect.iscoroutinefunction(getattr(AsyncioSingleTask, "stop", None))
        and inspect.iscoroutinefunction(getattr(TCPServer, "_idle_timeout", None))
        and inspect.iscoroutinefunction(getattr(TCPServer, "_initiate_server_close", None))
        and "self.idle_task" in _source(TCPServer.__init__)
        and "self._idle_timeout" in _source(TCPServer.protocol_send)
    ):
        log.warning("this Hypercorn reads connections in a way loopgate cannot close at EOF")
        return

    async def _read_data(self: Any) -> None:
        await original(self)
        # The client sends nothing more: once no request is in flight, the connection has nothing
        # more to send either. From now on its going idle closes it (the keep-alive timer runs
        # this instead of its wait), and a keep-alive wait already running ends here.
        self._idle_timeout = self._initiate_server_close
        await self.idle_task.stop()

    setattr(_read_data, _MARK, True)
    TCPServer._read_data = _read_data  # type: ignore[method-assign]  # the one patch of Hypercorn's reads


def _source(function: Any) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):  # no source installed: the shape cannot be checked
        return ""


__all__ = ["close_when_read_ends"]
