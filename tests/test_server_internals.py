"""The private shapes of Quart, Hypercorn and the standard library that ``service/server`` relies on.

Each seam degrades to the server's own behaviour when its shape is missing; these tests fail first,
so that an upgrade that changes a shape is noticed here rather than in production.
"""

from __future__ import annotations

import inspect
import multiprocessing

import pytest
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.protocol import ws_stream
from quart.asgi import ASGIHTTPConnection, ASGIWebsocketConnection
from wsproto.extensions import PerMessageDeflate

from service.server import quart_connections


def test_quart_http_connection_has_what_its_replacement_calls() -> None:
    for name in ("_create_request_from_scope", "handle_messages", "handle_request"):
        assert callable(getattr(ASGIHTTPConnection, name, None)), name
    assert issubclass(quart_connections.HTTPConnection, ASGIHTTPConnection)


def test_quart_websocket_connection_keeps_its_inbox_in_queue() -> None:
    source = inspect.getsource(ASGIWebsocketConnection)
    assert "self.queue" in source
    assert "self.queue.get" in source or "self.queue.put" in source


def test_hypercorn_builds_its_websocket_extensions_from_ws_stream() -> None:
    assert ws_stream.PerMessageDeflate is not None
    assert "PerMessageDeflate" in inspect.getsource(ws_stream)
    assert issubclass(ws_stream.PerMessageDeflate, PerMessageDeflate)


def test_hypercorn_gathers_websocket_messages_in_its_buffer_class() -> None:
    buffer = ws_stream.WebsocketBuffer(max_length=1)
    assert (buffer.length, buffer.max_length, buffer.value) == (0, 1, None)
    assert issubclass(ws_stream.FrameTooLargeError, Exception)
    assert "self.buffer.extend(event)" in inspect.getsource(ws_stream.WSStream)


def test_hypercorn_serves_each_connection_by_awaiting_its_tcp_server() -> None:
    assert callable(getattr(TCPServer, "__await__", None))
    assert callable(getattr(TCPServer, "run", None))


def test_a_worker_process_keeps_its_target_keyword_arguments() -> None:
    process = multiprocessing.Process(target=print, kwargs={"shutdown_event": None})
    assert process._kwargs == {"shutdown_event": None}  # what Hypercorn hands its workers


async def test_the_request_works_out_its_blueprints_as_quart_does() -> None:
    from quart import Blueprint, Quart, request
    from quart.wrappers import Request as QuartRequest

    app = Quart(__name__)
    app.request_class = quart_connections.Request
    outer, inner = Blueprint("outer", __name__), Blueprint("inner", __name__)
    seen: list[tuple[list[str], list[str]]] = []

    @inner.get("/nested")
    async def nested() -> str:
        seen.append((request.blueprints, QuartRequest.blueprints.fget(request)))  # type: ignore[attr-defined]
        return "ok"

    @app.get("/plain")
    async def plain() -> str:
        seen.append((request.blueprints, QuartRequest.blueprints.fget(request)))  # type: ignore[attr-defined]
        return "ok"

    outer.register_blueprint(inner)
    app.register_blueprint(outer)
    client = app.test_client()
    assert (await client.get("/nested")).status_code == 200
    assert (await client.get("/plain")).status_code == 200
    assert seen == [(["outer.inner", "outer"], ["outer.inner", "outer"]), ([], [])]
    async with app.test_request_context("/plain"):
        assert request.blueprints == []
        (rule,) = [rule for rule in app.url_map.iter_rules() if rule.endpoint.endswith("nested")]
        request.url_rule = rule
        assert request.blueprints == ["outer.inner", "outer"]  # a new rule is noticed


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Content-Length", "10")],
        [("content-length", "0")],
        [("Content-Length", "10"), ("Transfer-Encoding", "chunked")],
        [("Transfer-Encoding", "gzip, chunked")],
        [("Transfer-Encoding", "gzip"), ("Content-Length", "7")],
        [("Content-Length", "abc")],
        [("Content-Length", "-1")],
        [("Content-Length", "+5")],
        [("Content-Length", "5"), ("Content-Length", "9")],
        [("Host", "x"), ("CONTENT-LENGTH", "12"), ("Origin", "http://a")],
    ],
)
def test_the_request_reads_its_content_length_as_werkzeug_does(
    headers: list[tuple[str, str]],
) -> None:
    from quart.wrappers import Request as QuartRequest
    from werkzeug.datastructures import Headers

    async def no_push(path: str, headers: Headers) -> None:
        raise AssertionError("no push promises here")

    def made(kind: type[QuartRequest]) -> QuartRequest:
        return kind(
            "POST", "http", "/", b"", Headers(headers), "", "1.1", {}, send_push_promise=no_push
        )

    assert made(quart_connections.Request).content_length == made(QuartRequest).content_length
