"""How the stream connections' gate learns that uvicorn is shutting down, before uvicorn acts.

On SIGTERM or SIGINT uvicorn's ``Server.handle_exit`` only sets ``should_exit``; its main loop
then stops accepting and, at once, shuts down every connection itself: websockets get uvicorn's
close code 1012, and SSE streams, which it never ends, hold its exit until its graceful timeout.
uvicorn installs that handler with ``signal.signal`` for as long as it serves (since 0.29:
cooperative signal handling, Kludex/uvicorn#1600), so it is in place when the app's lifespan
starts and the gate is created.

:func:`watch_shutdown` puts a handler of its own in front of it, with the public ``signal``
module: the first SIGTERM or SIGINT closes the gate on the loop (websockets closed with 1001, SSE
streams ended, subscriptions deleted), waits until no stream connection is left, for at most
:data:`DRAIN_SECONDS` (and never more than half uvicorn's graceful timeout), then hands the signal
to uvicorn, whose own shutdown follows as before. A second SIGINT meanwhile hands both to uvicorn
at once (a second Ctrl+C still forces the exit); a SIGTERM that comes meanwhile (a supervisor's,
after a terminal's Ctrl+C reached every process) is handed on with the first.

A single uvicorn process raises the signal again once its shutdown is done, so it ends as killed
by SIGTERM; its supervisor (``--workers`` 2 or more) exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from ..shutdown_hooks import ShutdownGate

log = logging.getLogger("loopgate.shutdown")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DRAIN_SECONDS = 5.0

SignalHandler = Callable[[int, FrameType | None], Any]


def watch_shutdown(gate: ShutdownGate) -> Callable[[], None]:
    """Close ``gate`` as soon as uvicorn receives SIGTERM or SIGINT, before uvicorn's own shutdown
    closes the connections; returns what undoes it."""
    if threading.current_thread() is not threading.main_thread():
        return _nothing  # uvicorn handles no signal either (a server run in a thread)
    installed: dict[int, tuple[SignalHandler, SignalHandler]] = {}
    hold: _HoldBack | None = None
    for sig in SIGNALS:
        original = signal.getsignal(sig)
        if not uvicorn_handles(original):
            log.warning(
                "uvicorn does not handle %s as loopgate expects: its shutdown closes stream "
                "connections with its own close code",
                signal.Signals(sig).name,
            )
            continue
        assert callable(original)
        hold = hold or _HoldBack(gate, asyncio.get_running_loop(), _drain_seconds(original))
        handler = hold.handler(original)
        signal.signal(sig, handler)
        installed[sig] = (handler, original)

    def unwatch() -> None:
        for sig, (handler, original) in installed.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, original)

    return unwatch


def uvicorn_handles(handler: object) -> bool:
    """Whether ``handler`` (a signal's current handler) is a uvicorn server's ``handle_exit``."""
    try:
        from uvicorn.server import Server
    except ImportError:
        return False
    owner = getattr(handler, "__self__", None)
    return isinstance(owner, Server) and getattr(handler, "__name__", "") == "handle_exit"


def _drain_seconds(handler: object) -> float:
    """At most :data:`DRAIN_SECONDS`, and half uvicorn's graceful timeout when it has one."""
    config = getattr(getattr(handler, "__self__", None), "config", None)
    graceful = getattr(config, "timeout_graceful_shutdown", None)
    if isinstance(graceful, int | float) and graceful > 0:
        return min(DRAIN_SECONDS, graceful / 2)
    return DRAIN_SECONDS


class _HoldBack:
    """The first shutdown signal closes the gate, and reaches uvicorn once streams are gone."""

    def __init__(self, gate: ShutdownGate, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._gate = gate
        self._loop = loop
        self._seconds = seconds
        self._holding = False
        self._released = False
        self._held: list[tuple[int, SignalHandler]] = []
        self._task: asyncio.Task[None] | None = None

    def handler(self, original: SignalHandler) -> SignalHandler:
        def hold_back(sig: int, frame: FrameType | None) -> None:
            if self._released or self._loop.is_closed():
                original(sig, frame)
            elif self._holding:
                # A SIGTERM (a supervisor's, after the Ctrl+C of a terminal reached every
                # process) waits with the first signal. A second Ctrl+C is for uvicorn at once,
                # after the first: uvicorn then forces its exit, as it would have.
                self._held.append((sig, original))
                if sig == signal.SIGINT:
                    self._hand_on()
            else:
                self._holding = True
                self._held.append((sig, original))
                # A signal handler runs between two bytecodes of the main thread, the loop's:
                # hand the work to the loop, as asyncio's own signal handling does.
                self._loop.call_soon_threadsafe(self._begin, sig)

        return hold_back

    def _begin(self, sig: int) -> None:
        self._gate.close(f"uvicorn received {signal.Signals(sig).name}")
        self._task = self._loop.create_task(self._release(), name="shutdown-hold")

    async def _release(self) -> None:
        try:
            if not await self._gate.drained(self._seconds):
                log.warning(
                    "stream connections still open %.1f s after shutdown began: uvicorn closes "
                    "them now",
                    self._seconds,
                )
        finally:
            self._hand_on()

    def _hand_on(self) -> None:
        """Give uvicorn every signal held back, in the order they came."""
        self._released = True
        held, self._held = self._held, []
        for sig, original in held:
            original(sig, None)


def _nothing() -> None:
    pass
