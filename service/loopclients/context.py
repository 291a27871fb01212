"""The registry of the running code, in a context variable, as Quart keeps its app context.

The extension binds the registry of the serving event loop once per ASGI call (request,
websocket or lifespan) and resets it when the call ends; tasks started inside the call inherit it.
Code that runs its own event loop binds one with ``with registry.bind():``.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import Registry

_cv_registry: contextvars.ContextVar[Registry] = contextvars.ContextVar("loopclients.registry")

_NO_REGISTRY = (
    "Working outside of a loopclients context: no client registry is bound. Clients are reached "
    "from the request, websocket and background-task handlers of an app that called "
    "LoopClients.init_app(), or inside 'with registry.bind():' for code that runs its own event "
    "loop."
)


def has_registry() -> bool:
    """Whether a registry is bound in the current context."""
    return _cv_registry.get(None) is not None or _registry_from_app() is not None


def current_registry() -> Registry:
    """The registry bound to the current context.

    Outside any bound context, inside an app context of an app with the extension (a task that
    was started outside a request, for one), the registry of the running loop is found through
    the app, without binding it.

    Raises:
        RuntimeError: no registry is bound and no app context has one.
    """
    registry = _cv_registry.get(None)
    if registry is None:
        registry = _registry_from_app()
    if registry is None:
        raise RuntimeError(_NO_REGISTRY)
    return registry


def _registry_from_app() -> Registry | None:
    from quart import current_app, has_app_context

    from .extension import EXTENSION_KEY, LoopClients

    if not has_app_context():
        return None
    clients = current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(clients, LoopClients):
        return None
    return clients.registry_for_running_loop()
