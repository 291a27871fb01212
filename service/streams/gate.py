"""Long-lived connections of a worker, and the moment they must end.

Hypercorn runs an app's lifespan shutdown only after every connection is gone (or its graceful
timeout cancelled them), so ``app.shutdown_event`` and ``while_serving`` teardown come too late to
close websockets and SSE streams cleanly. :class:`ConnectionGate` watches for the start of the
shutdown itself:

* a Hypercorn worker (``workers >= 1``) is told to stop through a multiprocessing event that its
  master sets on SIGTERM/SIGINT; the gate polls that same event, as Hypercorn does, every 0.1 s;
* under uvicorn and Granian, the worker's first SIGTERM or SIGINT, through the running server's
  ``watch_shutdown`` (``service/server/{uvicorn,granian}/shutdown.py``), which then holds the
  server's own shutdown back until :meth:`ConnectionGate.drained`, for a few seconds at most;
* the worker's parent (the Hypercorn master) disappearing;
* the lifespan shutdown, as a last resort (single-process ``workers = 0`` serving, test clients).

When any of them fires, the gate's ``closing`` event is set and its callbacks run: the fan-out hub
closes every subscriber with 1001 and deletes its subscriptions, queue-mode connections nack what
they hold. The gate also bounds the number of stream connections of the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ..config import current_settings
from ..errors import Unavailable
from ..loopclients import ClientSpec
from ..server import watch_shutdown
from ..server.hypercorn.shutdown import server_shutdown_event

log = logging.getLogger("loopgate.shutdown")

POLL_INTERVAL = 0.1


class ConnectionGate:
    """Counts a worker's stream connections and tells them when the server shuts down."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.connections = 0
        self.closing = asyncio.Event()
        self._callbacks: dict[Callable[[], object], None] = {}
        self._task: asyncio.Task[None] | None = None
        self._parent = os.getppid()
        self._hypercorn_event = server_shutdown_event()
        self._unwatch: Callable[[], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    async def create(cls) -> ConnectionGate:
        gate = cls(current_settings().stream_max_connections)
        gate._task = asyncio.get_running_loop().create_task(gate._watch(), name="shutdown-watch")
        gate._unwatch = watch_shutdown(gate)
        return gate

    async def _watch(self) -> None:
        while not self.closing.is_set():
            if self._hypercorn_event is not None and self._hypercorn_event.is_set():
                self.close("the server is shutting down")
                return
            if os.getppid() != self._parent:
                self.close("the server's master process is gone")
                return
            await asyncio.sleep(POLL_INTERVAL)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` (on the loop) when shutdown begins."""
        self._callbacks[callback] = None

    def discard(self, callback: Callable[[], object]) -> None:
        """Forget a callback given to :meth:`on_close`."""
        self._callbacks.pop(callback, None)

    def close(self, why: str) -> None:
        """Begin shutdown: set ``closing`` and run the callbacks once."""
        if self.closing.is_set():
            return
        log.info("closing stream connections: %s", why)
        self.closing.set()
        for callback in list(self._callbacks):
            try:
                callback()
            except Exception:
                log.exception("a shutdown callback failed")

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no stream connection is open; whether none is.

        A server that closes connections itself as soon as its shutdown begins (uvicorn,
        granian) is held back with this, so that streams end with loopgate's own close first.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _count(self, delta: int) -> None:
        self.connections += delta
        if self.connections:
            self._idle.clear()
        else:
            self._idle.set()

    def admit(self) -> None:
        """Check that one more connection would be accepted.

        Raises:
            Unavailable: the worker is at ``stream_max_connections`` or shutting down.
        """
        if self.closing.is_set():
            raise Unavailable("the server is shutting down", retry_after=1)
        if self.connections >= self.max_connections:
            raise Unavailable(
                f"this worker serves its maximum of {self.max_connections} stream connections",
                retry_after=5,
            )

    def connection(self) -> _Held:
        """``with gate.connection():`` holds one connection slot (raises like :meth:`admit`)."""
        return _Held(self)

    async def aclose(self) -> None:
        self.close("the app is shutting down")
        unwatch, self._unwatch = self._unwatch, None
        if unwatch is not None:
            unwatch()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


GATE: ClientSpec[ConnectionGate] = ClientSpec(
    "connection-gate", create=ConnectionGate.create, close=ConnectionGate.aclose
)


class _Held:
    """What :meth:`ConnectionGate.connection` returns. A class rather than ``@contextmanager``,
    whose generator would stay alive, with its frame, for as long as each stream connection."""

    __slots__ = ("_entered", "_gate")

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._entered = False

    def __enter__(self) -> None:
        self._gate.admit()
        self._gate._count(1)
        self._entered = True

    def __exit__(self, *exc_info: object) -> None:
        if self._entered:
            self._entered = False
            self._gate._count(-1)
