"""Which registry the running code uses.

Inside an app (a request, a websocket, the lifespan, a background task: anything that runs in
Quart's app context) the registry is the one of the running event loop, found through the app's
extension: nothing is written per request. A context variable holds a registry bound explicitly,
as Quart's ``globals.py`` holds its contexts: ``with registry.bind():`` sets it and resets it on
exit, for code that runs its own event loop (a script, a test) and for the factories, which run in
a task of their own with their registry bound.
"""

from __future__ import annotations

import contextvars
from typing import TYPE_CHECKING

from quart import current_app, has_app_context

if TYPE_CHECKING:
    from .extension import LoopClients
    from .registry import Registry

EXTENSION_KEY = "loopclients"  # where init_app keeps the extension in app.extensions

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

    A registry bound with :meth:`Registry.bind` comes first; otherwise, inside the app context of
    an app with the extension, the running loop's registry of that app.

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
    # On every client lookup of every request: no import and no isinstance here.
    if not has_app_context():
        return None
    clients: LoopClients | None = current_app.extensions.get(EXTENSION_KEY)
    return None if clients is None else clients.registry_for_running_loop()
