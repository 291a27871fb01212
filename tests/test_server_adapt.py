"""What loopgate adapts in uvicorn and granian, checked against the installed versions: a test
here fails when an internal the adaptation reaches into, or a flag the production flags name,
changes."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from conftest import make_settings
from quart import Quart

from devtools.servers import GRANIAN_FLAGS, UVICORN_FLAGS
from service.logs import JsonFormatter
from service.server.uvicorn import adapt


class Transport(asyncio.Transport):
    """What uvicorn's protocol writes, and whether it closed or shut its side."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False
        self.eof = False

    def write(self, data: Any) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol


async def serve(*chunks: bytes, compression: bool = False) -> tuple[Any, Transport, list[Any]]:
    """Feed ``chunks`` to loopgate's uvicorn protocol over an app that records its scopes."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    scopes: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scopes.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    adapt.install(Quart(__name__), make_settings(stream_compression=compression))
    config = Config(app, h11_max_incomplete_event_size=16384, timeout_keep_alive=5)
    config.load()
    protocol = adapt.HttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    for chunk in chunks:
        protocol.data_received(chunk)
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    return protocol, transport, scopes


def test_the_uvicorn_protocol_is_loopgates_for_this_version() -> None:
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    # A new uvicorn: check the shape adapt.py relies on, then widen SUPPORTED.
    assert adapt.FITS, f"uvicorn {uvicorn.__version__} is not one adapt.py was checked against"
    assert adapt.HttpToolsProtocol is not HttpToolsProtocol
    assert issubclass(adapt.HttpToolsProtocol, HttpToolsProtocol)
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    assert issubclass(adapt.WebSocketsSansIOProtocol, WebSocketsSansIOProtocol)
    assert adapt.WebSocketsSansIOProtocol is not WebSocketsSansIOProtocol

    def value(flag: str) -> str:
        return UVICORN_FLAGS[UVICORN_FLAGS.index(flag) + 1]

    assert value("--http") == "service.server.uvicorn.adapt:HttpToolsProtocol"
    assert value("--ws") == "service.server.uvicorn.adapt:WebSocketsSansIOProtocol"


async def test_a_head_over_the_limit_is_431_and_one_under_it_is_served() -> None:
    head = b"GET /x HTTP/1.1\r\nHost: x\r\nX-P: %s\r\n\r\n"
    _, transport, scopes = await serve(head % (b"y" * 15000))
    assert transport.written.startswith(b"HTTP/1.1 204") and len(scopes) == 1
    _, transport, scopes = await serve(head % (b"y" * 17000))
    assert transport.written.startswith(b"HTTP/1.1 431") and scopes == []
    body = transport.written.split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["error"]["code"] == 431
    assert transport.eof  # the answer goes out before the connection closes


async def test_a_head_that_keeps_coming_is_refused_before_it_ends() -> None:
    pieces = [b"GET /x HTTP/1.1\r\nHost: x\r\n"] + [b"X-P: " + b"y" * 1000 + b"\r\n"] * 40
    _, transport, scopes = await serve(*pieces)
    assert transport.written.startswith(b"HTTP/1.1 431") and scopes == []


async def test_an_unparsable_request_is_a_json_400() -> None:
    _, transport, _ = await serve(b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400")
    body = json.loads(transport.written.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["status"] == "INVALID_ARGUMENT"


async def test_the_head_timer_runs_from_the_connection_until_the_head_is_parsed() -> None:
    protocol, transport, _ = await serve(b"GET /x HTTP/1.1\r\n")
    timer = protocol._head_timer
    assert timer is not None  # armed at the start, not reset by the bytes that came
    timer._run()
    assert transport.closed
    protocol, transport, _ = await serve(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert protocol._head_timer is not None  # armed again once the response was sent


@pytest.mark.parametrize("compression", [False, True])
async def test_the_websocket_compression_offer_reaches_uvicorn_only_when_enabled(
    compression: bool,
) -> None:
    offer = b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    _, _, scopes = await serve(
        b"POST /x HTTP/1.1\r\nHost: x\r\n" + offer + b"Content-Length: 0\r\n\r\n",
        compression=compression,
    )
    names = [name for name, _ in scopes[0]["headers"]]
    assert (b"sec-websocket-extensions" in names) is compression


def test_the_granian_flags_are_granians() -> None:
    from granian.cli import cli

    known = {opt for param in cli.params for opt in param.opts}
    named = {flag for flag in GRANIAN_FLAGS if flag.startswith("--")}
    assert named <= known, named - known


def test_uvicorns_and_granians_own_access_lines_have_no_query_string() -> None:
    uvicorn_record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/ws?access_token=secret", "1.1", 200),
        None,
    )
    granian_record = logging.LogRecord(
        "granian.access", logging.INFO, __file__, 1, "%(path)s", None, None
    )
    granian_record.args = {  # what granian's log_request passes: a mapping
        "addr": "127.0.0.1",
        "path": "/ws",
        "query_string": "access_token=secret",
        "method": "GET",
        "status": 200,
        "protocol": "HTTP/1.1",
        "dt_ms": 1.5,
    }
    for record in (uvicorn_record, granian_record):
        entry = json.loads(JsonFormatter().format(record))
        assert entry["path"] == "/ws" and entry["status"] == "200", entry
        assert "secret" not in json.dumps(entry)
