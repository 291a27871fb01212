"""The Quart extension: one :class:`Registry` per event loop that serves the app.

::

    clients = LoopClients([PUBLISHER, DB])
    clients.init_app(app)

``init_app`` does two things:

* keeps the extension in ``app.extensions["loopclients"]``, where every handler's ``SPEC.get()``
  finds the registry of its event loop (through Quart's app context; nothing is bound per request);
* registers a ``while_serving`` lifespan that creates the eager clients when the app starts
  serving (a client that fails is logged and left to later calls: the app starts degraded) and
  closes every client, in reverse creation order, when it stops.

Each worker process, or each thread running its own loop, gets registries of its own: a client is
never shared between event loops.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import AsyncGenerator, Iterable
from typing import Any

from quart import Quart

from .context import EXTENSION_KEY
from .registry import ClientSpec, Hooks, Registry

log = logging.getLogger("loopclients")


class LoopClients:
    """Clients created once per event loop for a Quart app.

    Args:
        clients: the clients to declare, in startup order (:meth:`add` declares more).
        app: bind at once, as ``LoopClients(clients, app)``; or call :meth:`init_app` later.
        config: handed to every registry as :attr:`Registry.config`, for the factories.
        eager: create the eager clients when the app starts serving; otherwise on first use.
        create_timeout, close_timeout, backoff_initial, backoff_max, hooks: as for
            :class:`Registry`.
    """

    def __init__(
        self,
        clients: Iterable[ClientSpec[Any]] = (),
        app: Quart | None = None,
        *,
        config: Any = None,
        eager: bool = True,
        create_timeout: float = 10.0,
        close_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        hooks: Hooks | None = None,
    ) -> None:
        self.specs: list[ClientSpec[Any]] = []
        for spec in clients:
            self.add(spec)
        self.config = config
        self.eager = eager
        self._options: dict[str, Any] = {
            "create_timeout": create_timeout,
            "close_timeout": close_timeout,
            "backoff_initial": backoff_initial,
            "backoff_max": backoff_max,
            "hooks": hooks,
        }
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Registry] = (
            weakref.WeakKeyDictionary()
        )
        if app is not None:
            self.init_app(app)

    def add(self, spec: ClientSpec[Any]) -> ClientSpec[Any]:
        """Declare one more client (before the app serves); returns ``spec``."""
        if any(known.name == spec.name for known in self.specs):
            raise ValueError(f"two clients are named {spec.name!r}")
        self.specs.append(spec)
        return spec

    def init_app(self, app: Quart) -> None:
        """Bind to ``app``: its handlers reach the clients, its lifespan creates and closes them."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError("LoopClients is already bound to this app")
        app.extensions[EXTENSION_KEY] = self
        app.while_serving(self._serve)

    def registry_for_running_loop(self) -> Registry:
        """The running loop's registry, made on first use."""
        loop = asyncio.get_running_loop()
        registry = self._by_loop.get(loop)
        if registry is None:
            registry = self._by_loop.setdefault(
                loop, Registry(self.specs, config=self.config, **self._options)
            )
        return registry

    async def _serve(self) -> AsyncGenerator[None, None]:
        registry = self.registry_for_running_loop()
        if self.eager:
            for name, reason in (await registry.start()).items():
                log.warning("starting degraded: client %r is down: %s", name, reason)
        try:
            yield
        finally:
            try:
                await registry.aclose()
            except ExceptionGroup as group:
                for error in group.exceptions:
                    log.error("%s", error)
            finally:
                # A later serve on the same loop (a test client run twice) starts afresh.
                if self._by_loop.get(registry.loop) is registry:
                    del self._by_loop[registry.loop]
