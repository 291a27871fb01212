"""The app factory: settings, clients, blueprints, lifecycle and the one error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from quart import Quart, Response, jsonify
from quart_schema import Info, QuartSchema, RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from . import gctune, metrics, server
from .auth import limits
from .auth.access import SECURITY_SCHEMES, init_auth
from .clients import builtin_clients
from .clients.pubsub.streaming_pull import STREAMING
from .config import Settings, load_settings
from .errors import ServiceError, Unavailable, describe_validation_error, error_body
from .logs import configure_logging, init_request_ids
from .loopclients import ClientSpec, ClientUnavailable, ForeignLoopError, LoopClients
from .openapi import LoopgateOpenAPIProvider
from .routes import health, publish, storage, subscribe
from .streams.gate import GATE
from .streams.hub import FANOUT

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
        SettingsError: a ``LOOPGATE_*`` variable is unknown or invalid.
    """
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Quart("loopgate")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["QUART_SCHEMA_CONVERT_CASING"] = False
    QuartSchema(
        app,
        info=Info(title="loopgate", version="0.1.0"),
        security_schemes=SECURITY_SCHEMES,
        openapi_provider_class=LoopgateOpenAPIProvider,
    )
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
    server.install(app, settings)
    _register_error_handlers(app)

    if settings.gc_tuning:

        @app.while_serving
        async def settle_garbage_collection() -> AsyncGenerator[None, None]:
            gctune.settle()  # after the clients' startup allocations
            yield

    return app


def _register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ServiceError)
    async def service_error(error: ServiceError) -> tuple[Response, int, dict[str, str]]:
        return _service_error(error)

    @app.errorhandler(ClientUnavailable)
    async def client_unavailable(error: ClientUnavailable) -> tuple[Response, int, dict[str, str]]:
        return _service_error(Unavailable(error.message, retry_after=error.retry_after))

    @app.errorhandler(ForeignLoopError)
    async def foreign_loop(error: ForeignLoopError) -> tuple[Response, int]:
        log.error("%s", error)
        return jsonify(error_body(500, error.message)), 500

    @app.errorhandler(RequestSchemaValidationError)
    async def schema_error(error: RequestSchemaValidationError) -> tuple[Response, int]:
        return jsonify(error_body(400, describe_validation_error(error.validation_error))), 400

    @app.errorhandler(UnicodeDecodeError)
    async def undecodable(error: UnicodeDecodeError) -> tuple[Response, int]:
        # Quart decodes the body as UTF-8 before parsing JSON; bad bytes are the caller's fault.
        return jsonify(error_body(400, "request body is not valid UTF-8")), 400

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> tuple[Response, int, dict[str, str]]:
        code = error.code or 500
        message = error.description or error.name
        if code == 413:
            message = f"request body larger than {app.config['MAX_CONTENT_LENGTH']} bytes"
        allowed = getattr(error, "valid_methods", None)
        headers = {"Allow": ", ".join(allowed)} if allowed else {}
        return jsonify(error_body(code, message)), code, headers

    @app.errorhandler(Exception)
    async def unexpected(error: Exception) -> tuple[Response, int]:
        log.exception("unhandled error", exc_info=error)
        return jsonify(error_body(500, "internal error")), 500


def _service_error(error: ServiceError) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error.body()), error.status_code, error.headers()
