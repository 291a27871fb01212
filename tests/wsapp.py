"""The service plus a tiny websocket route shaped like the stream routes, for handshake tests
through a real Hypercorn server (``tests.wsapp:create_app()``)."""

from __future__ import annotations

from quart import Quart, websocket

from service import create_app as create_service_app
from service.auth.access import current_identity, requires
from service.auth.limits import connection_slot


def add_test_stream_route(app: Quart) -> Quart:
    """``/test/<topic>/ws``: needs ``subscribe:<topic>``, holds a connection slot, sends one
    line naming the caller, then echoes until the client closes."""

    @app.websocket("/test/<topic>/ws")
    @requires("subscribe", "topic")
    async def stream(topic: str) -> None:
        async with connection_slot():
            await websocket.accept()
            await websocket.send(f"{current_identity().name} on {topic}")
            while True:
                await websocket.send(await websocket.receive())

    return app


def create_app() -> Quart:
    return add_test_stream_route(create_service_app())
