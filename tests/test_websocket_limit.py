"""A websocket message over the size limit is refused once, and nothing sent after it is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from conftest import WAIT, Topic
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from test_hostile_clients import worker_pid
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

from service.server.hypercorn import websocket_limit

OVER_LIMIT = "x" * (256 * 1024 + 1000)  # over each server's websocket message limit (256 KiB)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_the_buffer_drops_what_it_gathered_and_refuses_the_rest() -> None:
    websocket_limit.keep_limit()
    websocket_limit.keep_limit()  # once per process, however often it is called
    buffer = WebsocketBuffer(max_length=10)
    buffer.extend(TextMessage(data="12345", message_finished=False))
    with pytest.raises(FrameTooLargeError):
        buffer.extend(TextMessage(data="678901", message_finished=False))
    assert buffer.value is None
    with pytest.raises(FrameTooLargeError):
        buffer.extend(TextMessage(data="x", message_finished=True))
    assert buffer.value is None


async def send_after_the_limit(port: int, path: str, frames: int, wait: float = WAIT) -> int | None:
    """Open a websocket, send ``frames`` messages over the limit without reading, and return the
    close code the server sent (``None`` if none arrived); each read waits up to ``wait``."""
    client = WSConnection(ConnectionType.CLIENT)
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    code = None
    try:
        writer.write(client.send(Request(host="127.0.0.1", target=path)))
        while not any(isinstance(event, AcceptConnection) for event in client.events()):
            client.receive_data(await asyncio.wait_for(reader.read(65536), WAIT))
        for _ in range(frames):
            writer.write(client.send(Message(data=OVER_LIMIT)))
            try:
                await asyncio.wait_for(writer.drain(), WAIT)
            except ConnectionError:
                break
        while code is None:
            data = await asyncio.wait_for(reader.read(65536), wait)
            if not data:
                break
            client.receive_data(data)
            for event in client.events():
                if isinstance(event, CloseConnection):
                    code = event.code
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()  # what it still holds for a server that stopped reading goes
    return code


@pytest.mark.server
@pytest.mark.emulator
async def test_a_client_that_goes_on_sending_after_1009_does_not_grow_the_worker(
    start_server: Any, topic: Topic, server_name: str, request: pytest.FixtureRequest
) -> None:
    wait = WAIT
    if server_name == "granian":
        # Granian has no message limit of its own: loopgate closes with 1009 at the first message
        # over it (service/server/granian), but granian then ends the connection while the
        # client is still sending, and the client is reset before it reads the close (none of
        # the 20 did). Nothing to be had from Python: the connection is granian's, in Rust.
        request.applymarker(pytest.mark.xfail(strict=True, reason="granian resets, no 1009 read"))
        wait = 3  # no close is read: the test need not wait long to see it
    server = await start_server(server=server_name)
    worker = worker_pid(server)
    before = peak_rss_mib(worker)
    path = f"/v1/topics/{topic.name}/stream"
    codes = await asyncio.wait_for(
        asyncio.gather(*(send_after_the_limit(server.port, path, 40, wait) for _ in range(20))),
        WAIT * 4,
    )
    # Without the bound every connection kept what it was sent: the peak grew by about 200 MiB.
    grown = peak_rss_mib(worker) - before
    assert grown < 80, f"the worker grew {grown:.0f} MiB"
    assert 1009 in codes
