"""How the stream connections' gate learns that Granian is shutting down, before Granian acts.

On SIGTERM (its master's, or the terminal's SIGINT) a Granian worker process sets its stop
signal at once: the worker stops serving and runs the app's lifespan shutdown, and the process
exits with the connections still open: websockets and SSE streams are cut without a close frame,
and the clients that the lifespan closes go before the streams that use them. Granian offers no
hook between the signal and its shutdown (emmett-framework/granian#796, and #547 for a lifespan
shutdown sent on the signal): each worker installs its handlers with the loop's
``add_signal_handler`` (``granian._signals.set_loop_signals``) before it starts the lifespan.

:func:`watch_shutdown` replaces those handlers with the loop's public ``add_signal_handler``:
the first SIGTERM or SIGINT closes the gate (websockets closed with 1001, SSE streams ended,
subscriptions deleted), waits until no stream connection is left, for at most
:data:`DRAIN_SECONDS`, then sets the worker's stop signal, as Granian's handler would have, and
Granian's shutdown follows as before. A second SIGINT sets it at once. Granian's master kills a
worker that is not gone ``--workers-kill-timeout`` seconds after its SIGTERM: keep that above
:data:`DRAIN_SECONDS`.

The stop signal is a local variable of the function that runs a Granian worker process, which
the worker's loop runs inside of; :func:`worker_stop_signal` finds it among the frames of the
running call stack. That is the one reach into Granian's internals here, for the Granian 2
releases whose worker functions have that shape (checked by ``tests/test_server_hooks.py``);
with any other shape it logs a warning and leaves Granian's own shutdown (the gate then closes
in the lifespan shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..shutdown_hooks import ShutdownGate

log = logging.getLogger("loopgate.shutdown")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_SECONDS = 5.0
SUPPORTED_MAJOR = "2."
# The functions that run a Granian ASGI worker process (granian/server/mp.py), and the name of
# their local variable holding the worker's stop signal.
WORKER_FUNCTIONS = ("_spawn_asgi_lifespan_worker", "_spawn_asgi_worker")
STOP_SIGNAL = "shutdown_event"


def watch_shutdown(gate: ShutdownGate) -> Callable[[], None]:
    """Close ``gate`` as soon as the Granian worker receives SIGTERM or SIGINT, and hold the
    worker's stop until its stream connections are gone; returns what undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing  # a Granian thread worker: its signals are its master's
    stop = worker_stop_signal()
    if stop is None:
        log.warning(
            "this Granian runs its workers in a way loopgate cannot hold back at shutdown: "
            "stream connections are cut without a close frame"
        )
        return _nothing
    loop = asyncio.get_running_loop()
    hold = _HoldBack(gate, loop, stop)
    for sig in SIGNALS:
        loop.add_signal_handler(sig, hold.received, sig)

    def unwatch() -> None:
        if loop.is_closed():
            return
        for sig in SIGNALS:
            # What Granian's own handler does (its function is out of reach once replaced).
            loop.add_signal_handler(sig, stop.set)

    return unwatch


def worker_stop_signal() -> Any:
    """The stop signal (``granian._granian.WorkerSignal``) of the Granian worker process whose
    loop runs the caller, or ``None`` when this is no Granian 2 worker process."""
    granian = sys.modules.get("granian")
    if granian is None or not str(getattr(granian, "__version__", "")).startswith(SUPPORTED_MAJOR):
        return None
    try:
        from granian._granian import WorkerSignal
        from granian.server.mp import MPServer
    except ImportError:
        return None
    codes = set()
    for name in WORKER_FUNCTIONS:
        function = getattr(getattr(MPServer, name, None), "__wrapped__", None)
        code = getattr(function, "__code__", None)
        if code is not None and STOP_SIGNAL in code.co_varnames:
            codes.add(code)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code in codes:
            stop = frame.f_locals.get(STOP_SIGNAL)
            return stop if isinstance(stop, WorkerSignal) else None
        frame = frame.f_back
    return None


class _HoldBack:
    """The first shutdown signal closes the gate, and stops the worker once streams are gone."""

    def __init__(self, gate: ShutdownGate, loop: asyncio.AbstractEventLoop, stop: Any) -> None:
        self._gate = gate
        self._loop = loop
        self._stop = stop
        self._holding = False
        self._released = False
        self._task: asyncio.Task[None] | None = None

    def received(self, sig: int) -> None:
        """What the loop calls (outside the signal handler proper) on SIGTERM or SIGINT."""
        if self._released:
            return
        if self._holding:
            if sig == signal.SIGINT:  # a second Ctrl+C: stop now
                self._release_now()
            return
        self._holding = True
        self._gate.close(f"granian received {signal.Signals(sig).name}")
        self._task = self._loop.create_task(self._release(), name="shutdown-hold")

    async def _release(self) -> None:
        try:
            if not await self._gate.drained(DRAIN_SECONDS):
                log.warning(
                    "stream connections still open %.1f s after shutdown began: granian stops "
                    "the worker now",
                    DRAIN_SECONDS,
                )
        finally:
            self._release_now()

    def _release_now(self) -> None:
        if not self._released:
            self._released = True
            self._stop.set()


def _nothing() -> None:
    pass
