"""The app factory: settings, clients, blueprints, lifecycle and the one error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from quart import Quart

from . import cors, gctune, malloctune, metrics, server
from .auth import limits
from .auth.access import SECURITY_SCHEMES, init_auth
from .clients import builtin_clients
from .clients.pubsub.streaming_pull import STREAMING
from .config import Settings, load_settings
from .error_responses import register_error_handlers
from .logs import configure_logging, init_loop_logging
from .loopclients import ClientSpec, LoopClients
from .openapi import init_openapi
from .request_ids import init_request_ids
from .routes import client, console, health, publish, storage, storage_signed, subscribe
from .streams.gate import GATE
from .streams.hub import FANOUT
from .tracing import init_tracing

log = logging.getLogger("loopgate")


def create_app(
    settings: Settings | None = None, *, clients: Sequence[ClientSpec[Any]] = ()
) -> Quart:
    """Build the loopgate app.

    Args:
        settings: the service settings; read from ``LOOPGATE_*`` variables when omitted.
        clients: clients of your own, declared with :class:`~service.loopclients.ClientSpec`;
            created, checked and closed per event loop like the built-in ones.

    Raises:
        SettingsError: a ``LOOPGATE_*`` variable is unknown or invalid, or
            ``OTEL_TRACES_EXPORTER`` names an exporter that is unknown or not installed.
    """
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Quart("loopgate")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    init_tracing(app)  # off unless OTEL_TRACES_EXPORTER names an exporter
    init_openapi(app, security_schemes=SECURITY_SCHEMES)
    init_request_ids(app)
    init_auth(app, settings)
    app.extensions[limits.EXTENSION] = limits.Limiter(settings)

    LoopClients(
        [*builtin_clients(), GATE, STREAMING, FANOUT, *clients],
        config=settings,
        eager=settings.eager,
        create_timeout=settings.client_create_timeout,
        close_timeout=settings.client_close_timeout,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
        hooks=metrics.CLIENT_HOOKS,
    ).init_app(app)

    app.register_blueprint(health.blueprint)
    app.register_blueprint(publish.blueprint)
    app.register_blueprint(subscribe.blueprint)
    app.register_blueprint(storage.blueprint)
    app.register_blueprint(storage_signed.blueprint)
    app.register_blueprint(client.blueprint)
    app.register_blueprint(console.blueprint)
    cors.install(app, settings)  # after the routes: every HTTP answer, errors included
    register_error_handlers(app)
    init_loop_logging(app)
    server.install(app, settings)  # last: its wrappers must see every request first

    if settings.malloc_tuning:

        @app.before_serving
        async def settle_allocator() -> None:
            malloctune.settle()  # process-wide, for every allocation from now on

    if settings.gc_tuning:

        @app.while_serving
        async def settle_garbage_collection() -> AsyncGenerator[None, None]:
            gctune.settle()  # after the clients' startup allocations
            yield

    return app
