"""Who may do what: API tokens and JWTs, scopes, and the one check every route makes.

A route states what it needs in one line; the resource is read from the route's arguments::

    @blueprint.post("/v1/topics/<topic>:publish")
    @requires("publish", "topic")
    async def publish(topic: str): ...

    @blueprint.websocket("/v1/topics/<topic>:stream")
    @requires("subscribe", "topic")          # Origin check, then credentials, before accept()
    async def stream(topic: str): ...

    @blueprint.get("/v1/topics/<topic>:events")
    @requires("subscribe", "topic", query_token=True)   # SSE: ?access_token= allowed
    async def events(topic: str): ...

Credentials come from ``Authorization: Bearer ...``; websockets (and routes marked ``query_token``,
for browsers' EventSource) also accept an ``access_token`` query parameter. A credential shaped like
a JWT is verified as one when a JWT key is configured; anything else is looked up among the API
tokens. Missing or bad credentials raise :class:`~service.errors.Unauthenticated` (401 with
``WWW-Authenticate``); valid ones without the scope raise :class:`~service.errors.Forbidden` (403).
Raised before ``websocket.accept()``, both reach a websocket client as an HTTP response.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from quart import Quart, current_app, g, has_websocket_context, request, websocket
from quart_schema import document_response, security_scheme

from ..config import Settings, SettingsError
from ..errors import ErrorResponse, Forbidden, Unauthenticated
from ..request_ids import principal_var
from .jwts import InvalidJwt, JwtVerifier, looks_like_jwt
from .tokens import ANONYMOUS, Identity, TokenFileError, TokenStore

P = ParamSpec("P")
R = TypeVar("R")

log = logging.getLogger("loopgate.auth")

EXTENSION = "loopgate.auth"
SECURITY_SCHEMES: dict[str, Any] = {"bearer": {"type": "http", "scheme": "bearer"}}
_MAX_CREDENTIAL = 8192

Resource = str | Callable[[Mapping[str, Any]], str] | None


class Authenticator:
    """The configured ways to authenticate, for one app.

    Raises:
        SettingsError: authentication is on but nothing is configured to authenticate with, or
            the token file or JWT key is unusable.
    """

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth == "enabled"
        self.allowed_origins = settings.allowed_origins
        self.reload_interval = settings.auth_reload_interval
        self.tokens: TokenStore | None = None
        if settings.auth_file is not None:
            try:
                self.tokens = TokenStore(settings.auth_file)
            except TokenFileError as exc:
                raise SettingsError(f"LOOPGATE_AUTH_FILE: {exc}") from None
        self.jwt = JwtVerifier.from_settings(settings)
        if self.enabled and self.tokens is None and self.jwt is None:
            raise SettingsError(
                "authentication is on but nothing to authenticate with: set LOOPGATE_AUTH_FILE "
                "and/or LOOPGATE_JWT_SECRET or LOOPGATE_JWT_PUBLIC_KEY_FILE, or set "
                "LOOPGATE_AUTH=disabled (only for development)"
            )

    def authenticate(self, credential: str | None) -> Identity:
        """The identity ``credential`` proves.

        Raises:
            Unauthenticated: no credential, or one that is not valid.
        """
        if not self.enabled:
            return ANONYMOUS
        if not credential:
            raise Unauthenticated(
                "missing credentials: send the token in the Authorization header (Bearer scheme)"
            )
        if len(credential) > _MAX_CREDENTIAL:
            raise Unauthenticated("invalid credentials", error="invalid_token")
        if self.jwt is not None and looks_like_jwt(credential):
            try:
                return self.jwt.verify(credential)
            except InvalidJwt as exc:
                raise Unauthenticated(str(exc), error="invalid_token") from None
        identity = self.tokens.lookup(credential) if self.tokens is not None else None
        if identity is None:
            raise Unauthenticated("invalid or unknown token", error="invalid_token")
        return identity

    def origin_allowed(self, origin: str | None) -> bool:
        """Non-browser clients send no Origin; browsers' origins must be listed."""
        return origin is None or "*" in self.allowed_origins or origin in self.allowed_origins

    @contextlib.asynccontextmanager
    async def reloading(self) -> AsyncIterator[None]:
        """While the block runs: re-read the token file on SIGHUP and when it changes."""
        store = self.tokens
        if store is None:
            yield
            return
        loop = asyncio.get_running_loop()
        installed = False
        try:
            # Hypercorn workers leave SIGHUP at its default action, which would end the worker.
            loop.add_signal_handler(signal.SIGHUP, store.reload_logged)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread, or no signals on this platform: polling still works
        poller = (
            asyncio.create_task(_poll(store, self.reload_interval), name="loopgate-token-poll")
            if self.reload_interval > 0
            else None
        )
        try:
            yield
        finally:
            if poller is not None:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
            if installed:
                loop.remove_signal_handler(signal.SIGHUP)


async def _poll(store: TokenStore, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        store.reload_if_changed()


def init_auth(app: Quart, settings: Settings) -> Authenticator:
    """Set up authentication for ``app`` (called by ``create_app``).

    Raises:
        SettingsError: see :class:`Authenticator`.
    """
    auth = Authenticator(settings)
    app.extensions[EXTENSION] = auth

    @app.while_serving
    async def token_reloading() -> AsyncGenerator[None, None]:
        if not auth.enabled:
            log.warning("authentication is DISABLED (LOOPGATE_AUTH=disabled): anyone may call")
        async with auth.reloading():
            yield

    return auth


def current_authenticator() -> Authenticator:
    auth: Authenticator = current_app.extensions[EXTENSION]
    return auth


def current_identity() -> Identity:
    """The identity the current request authenticated as.

    Raises:
        RuntimeError: the request has not been authorized (no :func:`requires` / :func:`authorize`).
    """
    identity: Identity | None = g.get("loopgate_identity")
    if identity is None:
        raise RuntimeError("no identity: call authorize() or use @requires() first")
    return identity


def _credential(query_token: bool) -> str | None:
    is_websocket = has_websocket_context()
    connection = websocket if is_websocket else request
    header = connection.headers.get("Authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated(
                "the Authorization header must use the Bearer scheme", error="invalid_request"
            )
        return value.strip()
    if "access_token" in connection.args:
        if not (query_token or is_websocket):
            raise Unauthenticated(
                "access_token in the query string is accepted for streams only; "
                "send the token in the Authorization header (Bearer scheme)",
                error="invalid_request",
            )
        return connection.args["access_token"]
    return None


def check_origin() -> None:
    """Refuse a websocket whose ``Origin`` is not in ``LOOPGATE_ALLOWED_ORIGINS`` (403).

    :func:`requires` calls it for websocket routes; call it yourself in a websocket handler that
    does not use :func:`requires`, before ``websocket.accept()``.
    """
    origin = websocket.headers.get("Origin")
    if not current_authenticator().origin_allowed(origin):
        log.warning("websocket refused: origin %r is not allowed", (origin or "")[:200])
        raise Forbidden(f"origin {(origin or '')[:200]!r} may not open websockets here")


async def authorize(action: str, resource: str, *, query_token: bool = False) -> Identity:
    """Authenticate the current request (once) and check it may do ``action`` on ``resource``.

    Args:
        action: ``publish``, ``subscribe``, ``storage:read``, ``storage:write``...
        resource: the topic, bucket... the scope names.
        query_token: accept ``?access_token=`` on an HTTP route (SSE); websockets always do.

    Raises:
        Unauthenticated: missing or invalid credentials (401).
        Forbidden: the websocket's Origin is not allowed, or the identity lacks the scope (403).
    """
    if has_websocket_context():
        check_origin()
    identity: Identity | None = g.get("loopgate_identity")
    if identity is None:
        auth = current_authenticator()
        try:
            identity = auth.authenticate(_credential(query_token) if auth.enabled else None)
        except Unauthenticated as exc:
            log.info("authentication failed: %s", exc.message)
            raise
        g.loopgate_identity = identity
        principal_var.set(identity.name)
    if not identity.allows(action, resource):
        scope = f"{action}:{resource}"
        log.info("permission denied: %r lacks scope %r", identity.name, scope)
        raise Forbidden(f"{identity.name!r} lacks the scope {scope!r}", scope=scope)
    return identity


def requires(
    action: str, resource: Resource = None, *, query_token: bool = False
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate a route (HTTP or websocket) so it runs only for callers with the scope.

    Args:
        action: the scope's action, e.g. ``"publish"``.
        resource: the name of the route argument that holds the resource (``"topic"``), a function
            of the route arguments returning it, or ``None`` for ``"*"``.
        query_token: also accept ``?access_token=`` on this HTTP route (for SSE).
    """

    def decorator(view: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(view)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            if resource is None:
                name = "*"
            elif callable(resource):
                name = resource(kwargs)
            else:
                name = str(kwargs[resource])
            await authorize(action, name, query_token=query_token)
            return await view(*args, **kwargs)

        documented = document_response(ErrorResponse, 401)(wrapper)
        documented = document_response(ErrorResponse, 403)(documented)
        return security_scheme([{"bearer": []}])(documented)

    return decorator
