"""The shutdown hooks of uvicorn and Granian, and the shapes of those servers they rely on."""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Iterator
from typing import Any

import granian
import pytest
import uvicorn
from conftest import WAIT
from granian._granian import WorkerSignal
from granian._signals import set_loop_signals
from granian.server.mp import MPServer

from service.server.granian import shutdown as granian_shutdown
from service.server.uvicorn import shutdown as uvicorn_shutdown

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Gate:
    """What a server's hook is given (service/server/shutdown_hooks.py), observable."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.idle = asyncio.Event()
        self.why = ""

    def close(self, why: str) -> None:
        self.why = why
        self.closed.set()

    async def drained(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self.idle.wait()
        except TimeoutError:
            return False
        return True


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    """Whatever a test does to SIGINT's and SIGTERM's handlers is undone after it."""
    saved = {sig: signal.getsignal(sig) for sig in SIGNALS}
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    signal.set_wakeup_fd(wakeup)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    pass


def _uvicorn_server(timeout_graceful_shutdown: int) -> uvicorn.Server:
    """A uvicorn server whose handlers of the shutdown signals are in place, as while it serves."""
    server = uvicorn.Server(
        uvicorn.Config(_app, timeout_graceful_shutdown=timeout_graceful_shutdown)
    )
    for sig in SIGNALS:
        signal.signal(sig, server.handle_exit)
    return server


async def until(condition: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not condition():
            await asyncio.sleep(0.01)


def test_uvicorn_handles_the_shutdown_signals_with_signal_signal(signal_handlers: None) -> None:
    # What the uvicorn hook chains onto: Server.handle_exit, put in place with signal.signal for
    # as long as the server serves (Server.capture_signals, around the lifespan startup too).
    server = uvicorn.Server(uvicorn.Config(_app))
    with server.capture_signals():
        for sig in SIGNALS:
            assert uvicorn_shutdown.uvicorn_handles(signal.getsignal(sig)), sig
    assert not server.should_exit


async def test_uvicorn_gets_the_signal_once_the_stream_connections_are_gone(
    signal_handlers: None,
) -> None:
    server = _uvicorn_server(timeout_graceful_shutdown=20)
    gate = Gate()
    unwatch = uvicorn_shutdown.watch_shutdown(gate)
    signal.raise_signal(signal.SIGTERM)
    await asyncio.wait_for(gate.closed.wait(), WAIT)
    assert gate.why == "uvicorn received SIGTERM"
    await asyncio.sleep(0.05)
    assert not server.should_exit  # held back while streams are open
    gate.idle.set()
    await until(lambda: server.should_exit)
    assert not server.force_exit
    signal.raise_signal(signal.SIGINT)  # a second signal goes to uvicorn at once
    assert server.force_exit
    unwatch()
    assert signal.getsignal(signal.SIGTERM) == server.handle_exit


async def test_uvicorn_gets_a_second_sigint_at_once_after_the_first(
    signal_handlers: None,
) -> None:
    server = _uvicorn_server(timeout_graceful_shutdown=1)
    gate = Gate()  # never idle: a client that reads nothing
    unwatch = uvicorn_shutdown.watch_shutdown(gate)
    signal.raise_signal(signal.SIGINT)
    await asyncio.wait_for(gate.closed.wait(), WAIT)
    assert not server.should_exit
    signal.raise_signal(signal.SIGINT)  # Ctrl+C again: uvicorn forces its exit, at once
    assert server.should_exit and server.force_exit
    unwatch()


async def test_uvicorn_gets_the_signal_when_the_streams_take_too_long(
    signal_handlers: None,
) -> None:
    server = _uvicorn_server(timeout_graceful_shutdown=1)
    gate = Gate()  # never idle: a client that reads nothing
    unwatch = uvicorn_shutdown.watch_shutdown(gate)
    signal.raise_signal(signal.SIGTERM)
    await asyncio.wait_for(gate.closed.wait(), WAIT)
    assert not server.should_exit
    await until(lambda: server.should_exit)  # after half the graceful timeout
    assert not server.force_exit
    unwatch()


def test_granian_workers_install_their_signal_handlers_on_the_loop(
    signal_handlers: None,
) -> None:
    assert granian.__version__.startswith(granian_shutdown.SUPPORTED_MAJOR)
    loop = asyncio.new_event_loop()
    try:
        stop = set_loop_signals(loop)
        assert isinstance(stop, WorkerSignal)
        for sig in SIGNALS:
            # True: a handler of the loop's was there, one that the hook can replace.
            assert loop.remove_signal_handler(sig), sig
    finally:
        loop.close()


def test_granian_worker_functions_keep_their_stop_signal_in_a_local_variable() -> None:
    # What service/server/granian/shutdown.py reads from the running worker's frame.
    for name in granian_shutdown.WORKER_FUNCTIONS:
        code = getattr(MPServer, name).__wrapped__.__code__
        assert granian_shutdown.STOP_SIGNAL in code.co_varnames, name
        assert "set_loop_signals" in code.co_names, name


def test_the_stop_signal_is_found_from_inside_a_worker_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def worker() -> tuple[WorkerSignal, Any]:
        shutdown_event = WorkerSignal()
        return shutdown_event, called_below()

    def called_below() -> Any:
        return granian_shutdown.worker_stop_signal()

    wrapped = functools.wraps(worker)(lambda: worker())
    monkeypatch.setattr(MPServer, "_spawn_asgi_lifespan_worker", staticmethod(wrapped))
    stop, found = wrapped()
    assert found is stop
    assert granian_shutdown.worker_stop_signal() is None  # outside of it


class Stop:
    def __init__(self) -> None:
        self.stopped = False

    def set(self) -> None:
        self.stopped = True


async def test_granian_stops_the_worker_once_the_stream_connections_are_gone(
    monkeypatch: pytest.MonkeyPatch, signal_handlers: None
) -> None:
    stop = Stop()
    monkeypatch.setattr(granian_shutdown, "worker_stop_signal", lambda: stop)
    loop = asyncio.get_running_loop()
    for sig in SIGNALS:  # so that a hook that installs nothing fails the test, not the run
        signal.signal(sig, lambda sig, frame: None)
    gate = Gate()
    unwatch = granian_shutdown.watch_shutdown(gate)
    try:
        signal.raise_signal(signal.SIGTERM)
        await asyncio.wait_for(gate.closed.wait(), WAIT)
        assert gate.why == "granian received SIGTERM"
        signal.raise_signal(signal.SIGTERM)  # a SIGTERM more waits with the first
        await asyncio.sleep(0.05)
        assert not stop.stopped
        gate.idle.set()
        await until(lambda: stop.stopped)
        unwatch()
    finally:
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
