"""A websocket message over the size limit is refused once, and nothing sent after it is kept."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import WAIT, Topic
from hypercorn.protocol.ws_stream import FrameTooLargeError, WebsocketBuffer
from test_auth_access import worker_pids
from wsproto.events import TextMessage

from service.server import websocket_limit

OVER_LIMIT = "x" * (256 * 1024 + 1000)  # over hypercorn.toml's websocket_max_message_size


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


@pytest.mark.server
@pytest.mark.emulator
async def test_a_client_that_goes_on_sending_after_1009_does_not_grow_the_worker(
    start_server: Any, topic: Topic
) -> None:
    server = await start_server()
    (worker,) = worker_pids(server.process.pid)
    before = peak_rss_mib(worker)
    codes: list[int | None] = []
    async with aiohttp.ClientSession() as session:

        async def one() -> None:
            url = f"{server.url}/v1/topics/{topic.name}/stream"
            ws = await session.ws_connect(url, max_msg_size=0)
            try:
                for _ in range(40):  # 10 MiB, all after the limit was exceeded
                    await ws.send_str(OVER_LIMIT)
            except (aiohttp.ClientError, ConnectionError):
                pass
            await ws.close()
            codes.append(ws.close_code)

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), WAIT * 4)
    assert 1009 in codes
    # Without the bound every connection kept what it was sent: the peak grew by about 200 MiB.
    assert peak_rss_mib(worker) - before < 80
