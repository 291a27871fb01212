"""Clients created once per event loop: a Quart extension any app can use.

In an async server each worker runs one event loop, and clients such as grpc.aio channels and
aiohttp sessions belong to the loop that made them. Declare each client once, with an async
factory and an async close; every event loop gets its own instance, made on first use (or at
startup) under a lock, so that racing requests create it once::

    from quart import Quart
    from service.loopclients import ClientSpec, LoopClients

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    HTTP = ClientSpec("http", create=open_session, close=lambda s: s.close())

    app = Quart(__name__)
    LoopClients([HTTP]).init_app(app)

    @app.get("/")
    async def index():
        session = await HTTP.get()      # this event loop's session
        ...

A failed creation is retried with backoff and never cached; calls inside the backoff window
raise :class:`ClientUnavailable` (an app answers 503 with ``Retry-After``). At shutdown the clients
close in reverse creation order, each within a timeout, and every failure is reported.

This package depends on Quart only; it knows nothing of the rest of loopgate.
"""

from __future__ import annotations

from .context import current_registry, has_registry
from .errors import ClientError, ClientUnavailable, ForeignLoopError
from .extension import LoopClients
from .registry import Binding, ClientSpec, Hooks, Registry

__all__ = [
    "Binding",
    "ClientError",
    "ClientSpec",
    "ClientUnavailable",
    "ForeignLoopError",
    "Hooks",
    "LoopClients",
    "Registry",
    "current_registry",
    "has_registry",
]
