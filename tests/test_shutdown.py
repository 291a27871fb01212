"""The service's HTTP connections (:class:`service.streams.gate.HTTPConnection`): a request's tasks
end when the server cancels the connection."""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import WAIT, http_scope, make_settings

from service import create_app


async def test_cancelling_the_connection_cancels_its_handler() -> None:
    app = create_app(make_settings(eager=False))  # no client is needed
    started, ended = asyncio.Event(), asyncio.Event()

    @app.get("/slow")
    async def slow() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.set()
        return "never"

    scope = http_scope("/slow")
    idle = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await idle.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        raise AssertionError(f"nothing is sent: {message}")

    async with app.test_app():
        connection = asyncio.ensure_future(app(scope, receive, send))  # type: ignore[arg-type]
        await asyncio.wait_for(started.wait(), WAIT)
        connection.cancel()
        await asyncio.wait_for(asyncio.gather(connection, return_exceptions=True), WAIT)
        # The handler ended with the connection, not later.
        assert ended.is_set()


def test_hypercorn_connections_are_watched_by_one_wrapper() -> None:
    from hypercorn.asyncio.tcp_server import TCPServer

    from service.server.hypercorn import close as hypercorn_close

    hypercorn_close.bound_close()
    wrapped = TCPServer.__await__
    hypercorn_close.bound_close()  # create_app runs it for every app: it wraps only once
    assert TCPServer.__await__ is wrapped
    assert getattr(wrapped, "_loopgate_bounded", False)
