"""A rolling restart: subscribers of instance A reconnect, through the same address, to instance B
when A gets SIGTERM, and every message answered 200 reaches every one of them.

The subscribers: a plain websocket and a plain SSE client that do what any client must (reconnect
with their last id), loopgate's Python client and loopgate.js under Node. Two real servers on
loopback, the real emulator, and in front of them a TCP forwarder standing in
for the load balancer: new connections go to A until the deploy takes A out of the endpoints (as
Kubernetes does before its preStop wait ends), then to B. Messages are published through the
same address at a steady rate all along.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jskit
import pytest
from conftest import WAIT, PubSubAdmin, clean_exits

from service.sdk import Subscribed, subscribe

RATE = 40.0  # messages per second published through the balancer
SECONDS_OF_DUPLICATES = 1.5  # the most a client may receive twice, in seconds of messages


class Balancer:
    """A TCP forwarder on loopback: each new connection goes to the current ``upstream``."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Balancer:
        self.server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            self.tasks.discard(task)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            self.tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()


@dataclass
class Received:
    """What one subscriber got."""

    name: str
    ids: list[str] = field(default_factory=list)
    reconnects: int = 0
    first_frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return len(self.ids) - len(set(self.ids))


def _items(frame: dict[str, Any]) -> list[dict[str, Any]]:
    if frame["type"] == "message":
        return [frame]
    return list(frame["messages"]) if frame["type"] == "messages" else []


async def websocket_subscriber(
    session: aiohttp.ClientSession, url: str, topic: str, got: Received, stop: asyncio.Event
) -> None:
    """A websocket client doing what a client must: reconnect after a close, with its last id."""
    last: str | None = None
    while not stop.is_set():
        query = f"?lastEventId={last}" if last else ""
        try:
            async with session.ws_connect(f"{url}/v1/topics/{topic}/stream{query}") as ws:
                async for message in ws:
                    if message.type != aiohttp.WSMsgType.TEXT:
                        break
                    frame = json.loads(message.data)
                    if frame["type"] == "subscribed":
                        got.first_frames.append(frame)
                        last = last or frame["id"]
                    for item in _items(frame):
                        got.ids.append(item["messageId"])
                        last = item["id"]
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
        got.reconnects += 1


async def sse_subscriber(
    session: aiohttp.ClientSession, url: str, topic: str, got: Received, stop: asyncio.Event
) -> None:
    """An EventSource-like client: reconnect after the stream ends, with ``Last-Event-ID``."""
    last: str | None = None
    while not stop.is_set():
        headers = {"Last-Event-ID": last} if last else {}
        try:
            async with session.get(f"{url}/v1/topics/{topic}/events", headers=headers) as response:
                event_id, data = None, ""
                async for raw in response.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("id:"):
                        event_id = line[3:].strip()
                    elif line.startswith("data:"):
                        data += line[5:].strip()
                    elif not line and data:
                        frame = json.loads(data)
                        if frame["type"] == "subscribed":
                            got.first_frames.append(frame)
                        for item in _items(frame):
                            got.ids.append(item["messageId"])
                        last = event_id or last
                        event_id, data = None, ""
        except aiohttp.ClientError:
            await asyncio.sleep(0.05)
        got.reconnects += 1


async def python_client_subscriber(
    session: aiohttp.ClientSession, url: str, topic: str, got: Received, stop: asyncio.Event
) -> None:
    """loopgate's Python client, which reconnects, resumes and drops duplicates by itself."""

    def status(notice: object) -> None:
        if isinstance(notice, Subscribed):
            got.first_frames.append({"resumed": notice.resumed, "complete": notice.complete})

    async with subscribe(url, topic, session=session, on_status=status) as messages:
        async for message in messages:
            got.ids.append(message.message_id)


async def js_client_subscriber(
    session: aiohttp.ClientSession, url: str, topic: str, got: Received, stop: asyncio.Event
) -> None:
    """loopgate.js under Node (tests/js/subscriber.mjs), which reconnects, resumes and drops
    duplicates by itself."""
    script = jskit.JS_TESTS / "subscriber.mjs"
    process = await asyncio.create_subprocess_exec(
        jskit.node(), str(script), url, topic, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    try:
        async for line in process.stdout:
            event = json.loads(line)
            status = event.get("status")
            if status is None:
                got.ids.append(event["messageId"])
            elif status["state"] == "open":
                got.first_frames.append(status)
            elif status["state"] == "closed":
                raise AssertionError(f"loopgate.js stopped: {status}")
    finally:
        if process.returncode is None:
            process.terminate()  # the process this test started
            await process.wait()


@contextlib.asynccontextmanager
async def publishing(
    session: aiohttp.ClientSession, url: str, topic: str
) -> AsyncIterator[tuple[list[str], list[int]]]:
    """Publish one message per request at :data:`RATE` through ``url`` until the block ends;
    yields the ids answered 200 and the other statuses."""
    answered: list[str] = []
    refused: list[int] = []
    done = asyncio.Event()

    async def one(n: int) -> None:
        body = {"messages": [{"data": "", "attributes": {"n": str(n)}}]}
        try:
            async with session.post(f"{url}/v1/topics/{topic}:publish", json=body) as response:
                if response.status == 200:
                    answered.extend((await response.json())["messageIds"])
                else:
                    refused.append(response.status)
        except aiohttp.ClientError:
            refused.append(0)

    async def run() -> None:
        started, sent, tasks = time.monotonic(), 0, set()
        while not done.is_set():
            due = int((time.monotonic() - started) * RATE)
            for n in range(sent, due):
                task = asyncio.create_task(one(n))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            sent = max(sent, due)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1 / RATE)
        await asyncio.gather(*tasks)

    runner = asyncio.create_task(run())
    try:
        yield answered, refused
    finally:
        done.set()
        await runner


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {WAIT:g} s"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
async def test_a_rolling_restart_loses_nothing_for_any_client(
    start_server: Any, admin: PubSubAdmin, server_name: str
) -> None:
    topic = admin.create_topic(retention=3600)
    a = await start_server(server=server_name, wait="/readyz")
    b = await start_server(server=server_name, wait="/readyz")
    balancer = await Balancer(a.port).start()
    stop = asyncio.Event()
    jskit.npm_install()
    clients = [Received(kind) for kind in ("websocket", "sse", "python client", "loopgate.js")]
    kinds = [websocket_subscriber, sse_subscriber, python_client_subscriber, js_client_subscriber]
    try:
        async with aiohttp.ClientSession() as session:
            tasks = [
                asyncio.create_task(kind(session, balancer.url, topic, got, stop))
                for kind, got in zip(kinds, clients, strict=True)
            ]
            try:
                await _until(lambda: all(c.first_frames for c in clients), "subscribed on A")
                async with publishing(session, balancer.url, topic) as (answered, _):
                    await _until(lambda: len(answered) >= RATE, "a second of messages")
                    # The deploy: A leaves the endpoints, then gets SIGTERM and closes its
                    # streams. (A publish on a kept-alive connection to A may fail: it was not
                    # answered 200, and a client sends it again.)
                    balancer.upstream = b.port
                    a.process.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(a.process.wait, WAIT)
                    await _until(
                        lambda: all(len(c.first_frames) >= 2 for c in clients),
                        "resubscribed on B",
                    )
                    resumed_at = len(answered)
                    await _until(lambda: len(answered) >= resumed_at + RATE, "a second more")
                await _until(
                    lambda: all(set(answered) <= set(c.ids) for c in clients),
                    "everything delivered",
                )
            finally:
                stop.set()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await balancer.close()
    assert a.process.returncode in clean_exits(server_name)
    for got in clients:
        resumed = got.first_frames[1]
        assert resumed["resumed"] is True and resumed["complete"] is True, got.name
        assert set(answered) <= set(got.ids), got.name
        assert got.duplicates <= SECONDS_OF_DUPLICATES * RATE, (got.name, got.duplicates)
