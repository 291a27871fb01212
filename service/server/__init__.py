"""Every adaptation of a server's or Quart's internals, behind one entry point.

:func:`install` is what :func:`~service.create_app` calls. It puts in place:

* :mod:`.quart_connections`: Quart's HTTP connection class, whose request tasks end with their
  connection; its websocket class with a lighter inbox; each websocket's raw ASGI ``send`` in its
  scope, for the stream routes;
* :mod:`.request_body`: request bodies read as the handler consumes them (for uploads);
* :mod:`.deflate`: websocket compression declined unless enabled (Hypercorn);
* :mod:`.hypercorn_close`: at shutdown, connections whose clients read nothing are reset, so a
  worker always exits (Hypercorn);
* :mod:`.websocket_limit`: a websocket message over the size limit stops being buffered once it
  has been refused (Hypercorn);
* :mod:`.half_close`: an idle connection closed at once when its client closes it (Hypercorn);
* :mod:`.hypercorn_shutdown`: the stop event a Hypercorn master hands its workers, read by the
  stream connections' gate.

* :mod:`.framing`: requests whose framing is ambiguous (both ``Content-Length`` and
  ``Transfer-Encoding``: request smuggling) refused with 400 and the connection closed.

Each reach into a private internal is guarded: when the installed server or Quart lacks what it
expects, it logs a warning and leaves the server's own behaviour, and the test suite checks each
one against the installed versions.
"""

from __future__ import annotations

from quart import Quart

from ..config import Settings
from . import (
    deflate,
    framing,
    half_close,
    hypercorn_close,
    quart_connections,
    request_body,
    websocket_limit,
)


def install(app: Quart, settings: Settings) -> None:
    """Adapt ``app`` and the server running it (once per app; the server parts once per process)."""
    app.asgi_http_class = quart_connections.HTTPConnection
    app.asgi_websocket_class = quart_connections.WebsocketConnection
    if not isinstance(app.asgi_app, quart_connections.ExposeWebsocketSend):
        app.asgi_app = quart_connections.ExposeWebsocketSend(app.asgi_app)  # type: ignore[method-assign]  # ASGI middleware, as Quart documents it
    request_body.install(app)
    deflate.set_compression(settings.stream_compression)
    hypercorn_close.bound_close()
    websocket_limit.keep_limit()
    half_close.close_when_read_ends()
    framing.install(app)  # the outermost wrapper: it sees every request first
