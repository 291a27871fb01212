"""Every adaptation of a server's or Quart's internals, behind one entry point.

:func:`install` is what :func:`~service.create_app` calls. It puts in place what every server
needs:

* :mod:`.quart_connections`: Quart's HTTP connection class, whose request tasks end with their
  connection; its websocket class with a lighter inbox; each websocket's raw ASGI ``send`` in its
  scope, for the stream routes;
* :mod:`.request_body`: request bodies read as the handler consumes them (for uploads);
* :mod:`.framing`: requests whose framing is ambiguous (both ``Content-Length`` and
  ``Transfer-Encoding``: request smuggling) refused with 400 and the connection closed;

and then what the server running the app needs, from its own package: :mod:`.hypercorn`,
:mod:`.uvicorn` or :mod:`.granian` (see :func:`running_server`). :func:`watch_shutdown` is what
the stream connections' gate calls to learn when the server begins to shut down.

Each reach into a private internal is guarded: when the installed server or Quart lacks what it
expects, it logs a warning and leaves the server's own behaviour, and the test suite checks each
one against the installed versions.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from quart import Quart

from ..config import Settings
from . import framing, quart_connections, request_body
from .shutdown_hooks import ShutdownGate

SERVERS = ("hypercorn", "uvicorn", "granian")


def running_server() -> str:
    """The server this process runs under: ``hypercorn``, ``uvicorn`` or ``granian``.

    ``LOOPGATE_SERVER`` names it when set (for a server started from a script of your own, with
    ``uvicorn.run()`` for instance). Otherwise it is the server whose command started the process
    (its name in ``sys.argv[0]``: ``python -m uvicorn``, the ``granian`` script; the workers
    these start inherit it), then one of uvicorn and granian if imported outside a test run, and
    otherwise Hypercorn, which loopgate imports itself (also what Quart's test client gets).
    """
    named = os.environ.get("LOOPGATE_SERVER", "").strip().lower()
    if named in SERVERS:
        return named
    command = Path(sys.argv[0] if sys.argv else "")
    for server in SERVERS:
        if command.name == server or server in command.parts[-2:-1]:
            return server
    if "pytest" not in sys.modules:
        for server in ("granian", "uvicorn"):
            if server in sys.modules:
                return server
    return "hypercorn"


def _server_module() -> ModuleType:
    return importlib.import_module(f".{running_server()}", __name__)


def install(app: Quart, settings: Settings) -> None:
    """Adapt ``app`` and the server running it (once per app; the server parts once per process)."""
    app.asgi_http_class = quart_connections.HTTPConnection
    app.request_class = quart_connections.Request
    app.asgi_websocket_class = quart_connections.WebsocketConnection
    if not isinstance(app.asgi_app, quart_connections.ExposeWebsocketSend):
        app.asgi_app = quart_connections.ExposeWebsocketSend(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware, as Quart documents it
    request_body.install(app)
    framing.install(app)  # it sees every request before the app does
    _server_module().install(app, settings)  # its middleware, if any, around the framing guard


def watch_shutdown(gate: ShutdownGate) -> Callable[[], None]:
    """Have ``gate.close()`` run as soon as the running server begins to shut down (see
    :mod:`.shutdown_hooks`); returns what undoes it."""
    hook: Callable[[ShutdownGate], Callable[[], None]] = _server_module().watch_shutdown
    return hook(gate)
