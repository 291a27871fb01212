"""Cross-origin requests from browsers: CORS headers for the origins of ``LOOPGATE_ALLOWED_ORIGINS``.

:func:`install` applies quart-cors to every HTTP route of the app (publish, SSE, storage, the
JavaScript client, and routes added later): a preflight (``OPTIONS``) is answered by Quart's
automatic ``OPTIONS`` response, before any view and so before authentication, and every answer,
the JSON error responses of :mod:`service.error_responses` included, carries
``Access-Control-Allow-Origin`` for an allowed ``Origin``, so that a page can read an error as well
as a result. An origin not listed gets no CORS header at all (the browser then hides the answer);
``*`` in the list allows any origin, without credentials (the token travels in ``Authorization``,
which is not a browser credential).

Websockets are not CORS requests: their ``Origin`` is checked by
:func:`service.auth.access.check_origin` against the same list (a client without ``Origin``, not a
browser, is let through), so quart-cors's own websocket check, which refuses a handshake without
``Origin``, is turned off for every websocket route.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from typing import cast

from quart import Quart, Response, request
from quart.typing import WebsocketCallable
from quart_cors import cors, cors_exempt

from .config import Settings

ALLOW_HEADERS = (
    "Authorization",
    "Content-Type",
    "Last-Event-ID",
    "Range",
    "If-Range",
    "If-None-Match",
    "X-Request-ID",
)
EXPOSE_HEADERS = (
    "Retry-After",
    "ETag",
    "Content-Range",
    "Content-Length",
    "Accept-Ranges",
    "WWW-Authenticate",
    "X-Goog-Generation",
    "X-Request-ID",
)
ALLOW_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
MAX_AGE = 600  # seconds a browser may reuse a preflight's answer


def install(app: Quart, settings: Settings) -> None:
    """Answer cross-origin requests from ``settings.allowed_origins`` on ``app``'s HTTP routes."""
    cors(
        app,
        allow_origin=list(settings.allowed_origins),  # empty: no origin (never quart-cors' "*")
        allow_headers=list(ALLOW_HEADERS),
        allow_methods=list(ALLOW_METHODS),
        expose_headers=list(EXPOSE_HEADERS),
        allow_credentials=False,
        max_age=MAX_AGE,
    )
    only_for_browsers(app)
    exempt_websockets(app)

    @app.while_serving
    async def exempt_later_websockets() -> AsyncGenerator[None, None]:
        exempt_websockets(app)  # websocket routes registered after create_app() too
        yield


def only_for_browsers(app: Quart) -> None:
    """Run quart-cors's answer hook (just registered) only for requests that carry ``Origin``.

    quart-cors reads and normalises its settings on every response; for the requests of servers
    and scripts, which send no ``Origin``, that was a tenth of a publish's time in the app. They
    get only what quart-cors would have added, ``Vary: Origin``.
    """
    hooks = app.after_request_funcs[None]
    apply_cors = hooks.pop()  # the hook cors() registered last; its place is kept below

    async def cors_for_browsers(response: Response) -> Response:
        if not _has_origin(request.headers):
            response.headers.add("Vary", "Origin")
            return response
        return cast(Response, await apply_cors(response))

    hooks.append(cors_for_browsers)


def _has_origin(headers: Iterable[tuple[str, str]]) -> bool:
    """Whether the request carries ``Origin`` (``"Origin" in headers`` makes and catches an
    exception for each request that does not, which is most)."""
    return any(name.lower() == "origin" for name, _ in headers)


def exempt_websockets(app: Quart) -> None:
    """Leave the Origin check of ``app``'s websocket routes to loopgate's own."""
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        if getattr(rule, "websocket", False) and view is not None:
            cors_exempt(cast(WebsocketCallable, view))
