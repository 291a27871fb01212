"""The app factory: settings, clients, blueprints, lifecycle and the one error mapping."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from quart import Quart, Response, jsonify
from quart_schema import Info, QuartSchema, RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from . import gctune
from .auth import limits
from .auth.access import SECURITY_SCHEMES, init_auth
from .clients import builtin_clients
from .clients.pubsub.streaming_pull import STREAMING
from .config import Settings, load_settings
from .errors import ServiceError, describe_validation_error, error_body
from .logs import configure_logging, init_loop_logging, init_request_ids
from .loopclients.registry import ClientSpec, LoopRegistries, bind_registry
from .openapi import LoopgateOpenAPIProvider
from .routes import health, publish, storage, subscribe
from .server import deflate, framing, hypercorn_close
from .streams.gate import GATE, HTTPConnection
from .streams.hub import FANOUT

log = logging.getLogger("loopgate")


def create_app(
    settings: Settings | None = None, *, clients: Sequence[ClientSpec[Any]] = ()
) -> Quart:
    """Build the loopgate app.

    Args:
        settings: the service settings; read from ``LOOPGATE_*`` variables when omitted.
        clients: clients of your own, declared with :class:`~service.loopclients.registry.ClientSpec`;
            created, checked and closed per event loop like the built-in ones.

    Raises:
        SettingsError: a ``LOOPGATE_*`` variable is unknown or invalid.
    """
    settings = settings if settings is not None else load_settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Quart("loopgate")
    app.asgi_http_class = HTTPConnection  # request tasks end with their connection
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

    loops = LoopRegistries([*builtin_clients(), GATE, STREAMING, FANOUT, *clients], settings)
    app.extensions["loopgate"] = loops

    app.register_blueprint(health.blueprint)
    app.register_blueprint(publish.blueprint)
    app.register_blueprint(subscribe.blueprint)
    subscribe.install(app)
    deflate.set_compression(settings.stream_compression)
    hypercorn_close.bound_close()
    app.register_blueprint(storage.blueprint)
    _register_error_handlers(app)
    init_loop_logging(app)
    framing.install(app)  # last: the outermost wrapper, it sees every request first

    @app.before_request
    @app.before_websocket
    async def bind() -> None:
        # Quart runs startup in a task of its own and resets its context afterwards, so a context
        # variable set at startup never reaches requests: every request binds its loop's registry.
        bind_registry(loops.registry_for_running_loop())

    @app.while_serving  # type: ignore[type-var]
    async def lifespan() -> AsyncIterator[None]:
        registry = loops.registry_for_running_loop()
        bind_registry(registry)
        if settings.eager:
            for name, reason in (await registry.start()).items():
                log.warning("starting degraded: client %r is down: %s", name, reason)
        if settings.gc_tuning:
            gctune.settle()
        yield
        try:
            await registry.aclose()
        except ExceptionGroup as group:
            for error in group.exceptions:
                log.error("%s", error)
        finally:
            loops.forget(registry)

    return app


def _register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ServiceError)
    async def service_error(error: ServiceError) -> tuple[Response, int, dict[str, str]]:
        return jsonify(error.body()), error.status_code, error.headers()

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
