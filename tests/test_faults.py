"""Faults through a real Hypercorn server: the Pub/Sub emulator killed mid-traffic, and SIGTERM with
uploads, websockets and SSE streams open.

The outage uses an emulator of its own (the session's one is never stopped); a restarted emulator
is empty, so the test creates its topic again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import WAIT, Server, create_topic_at

from devtools.emulators import PubSubEmulator, StorageEmulator

pytestmark = [pytest.mark.server, pytest.mark.emulator]

MB = 1024 * 1024
PUBLISH_TIMEOUT = 2.0
# A request may take the publish timeout plus the grpc retries' last attempt and some scheduling
# on a loaded machine; past this the client counts it as hung.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=PUBLISH_TIMEOUT + 13)


class Traffic:
    """Concurrent publishers recording every outcome until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self.problems: list[str] = []
        self.ids: list[str] = []  # answered 2xx, in order
        self.stop = asyncio.Event()
        # A restarted emulator is empty: until the test re-creates the topic, a publish that
        # reaches it is rightly answered "topic does not exist".
        self.topic_may_be_missing = False

    async def publisher(self, session: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            body = {"messages": [{"data": base64.b64encode(b"%d-%d" % (n, i)).decode()}]}
            try:
                async with session.post(self.url, json=body, timeout=REQUEST_TIMEOUT) as response:
                    text = await response.text()
                    if response.status == 200:
                        self.ids.extend(json.loads(text)["messageIds"])
                    elif response.status == 503 and int(response.headers["Retry-After"]) >= 1:
                        assert json.loads(text)["error"]["status"] == "UNAVAILABLE"
                    elif (
                        response.status == 404
                        and self.topic_may_be_missing
                        and "does not exist" in text
                    ):
                        pass
                    else:
                        self.problems.append(f"{response.status} {dict(response.headers)} {text}")
                    self.outcomes[str(response.status)] += 1
            except TimeoutError:
                self.problems.append("a publish hung past the client's timeout")
                self.outcomes["hung"] += 1
            await asyncio.sleep(0.02)

    async def until(self, status: str, more_than: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.outcomes[status] <= more_than:
                assert not self.problems, self.problems
                await asyncio.sleep(0.05)


async def ready_status(session: aiohttp.ClientSession, server: Server) -> tuple[int, Any, str]:
    async with session.get(f"{server.url}/readyz", timeout=REQUEST_TIMEOUT) as response:
        return response.status, await response.json(), response.headers.get("Retry-After", "")


async def await_ready(session: aiohttp.ClientSession, server: Server, status: int) -> Any:
    async with asyncio.timeout(WAIT):
        while True:
            got, body, retry_after = await ready_status(session, server)
            if got == status:
                return body, retry_after
            await asyncio.sleep(0.1)


async def collect_ws(ws: aiohttp.ClientWebSocketResponse, into: set[str]) -> int | None:
    """Gather message ids until the socket closes; its close code."""
    async for msg in ws:
        frame = json.loads(msg.data)
        if frame["type"] == "messages":
            into.update(item["messageId"] for item in frame["messages"])
        elif frame["type"] == "message":
            into.add(frame["messageId"])
    return ws.close_code


async def collect_sse(response: aiohttp.ClientResponse, into: set[str]) -> None:
    """Gather the events' message ids until the stream ends (an event's ``id:`` is its cursor)."""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if event["type"] == "message":
                into.add(event["messageId"])


async def test_pubsub_killed_mid_traffic_answers_503_then_recovers(
    start_server: Any,
) -> None:
    emulator = PubSubEmulator()
    await asyncio.to_thread(emulator.start)
    try:
        await asyncio.to_thread(create_topic_at, emulator.host, "faults")
        server = await start_server(
            {
                "PUBSUB_EMULATOR_HOST": emulator.host,
                "LOOPGATE_PUBLISH_TIMEOUT": str(PUBLISH_TIMEOUT),
                "LOOPGATE_CLIENT_CREATE_TIMEOUT": "1",
                "LOOPGATE_BACKOFF_INITIAL": "0.2",
                "LOOPGATE_BACKOFF_MAX": "1",
            }
        )
        traffic = Traffic(f"{server.url}/v1/topics/faults:publish")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            ws = await session.ws_connect(f"{server.url}/v1/topics/faults/stream")
            assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
            events = await session.get(f"{server.url}/v1/topics/faults/events")
            assert events.status == 200
            await asyncio.wait_for(events.content.readline(), WAIT)  # "subscribed"
            by_ws: set[str] = set()
            by_sse: set[str] = set()
            readers = [
                asyncio.create_task(collect_ws(ws, by_ws)),
                asyncio.create_task(collect_sse(events, by_sse)),
            ]
            publishers = [asyncio.create_task(traffic.publisher(session, n)) for n in range(20)]
            try:
                await traffic.until("200", 100)

                assert emulator.process is not None
                emulator.process.kill()  # mid-traffic, without warning
                await asyncio.to_thread(emulator.stop)
                await traffic.until("503", 20)
                body, retry_after = await await_ready(session, server, 503)
                assert "publisher" in body["error"]["message"]
                assert int(retry_after) >= 1

                traffic.topic_may_be_missing = True
                await asyncio.to_thread(emulator.start)  # same port, empty
                await asyncio.to_thread(create_topic_at, emulator.host, "faults")
                answered_before = len(traffic.ids)
                await traffic.until("200", traffic.outcomes["200"] + 100)
                traffic.topic_may_be_missing = False
                body, _ = await await_ready(session, server, 200)
                assert body["clients"]["publisher"] == "ok"

                # Both streams still open, receiving what is published after the restart.
                async with asyncio.timeout(WAIT):
                    while not (
                        by_ws & set(traffic.ids[answered_before:])
                        and by_sse & set(traffic.ids[answered_before:])
                    ):
                        assert not any(reader.done() for reader in readers), readers
                        await asyncio.sleep(0.05)
            finally:
                traffic.stop.set()
                async with asyncio.timeout(WAIT):
                    await asyncio.gather(*publishers)
                await ws.close()
                events.close()
                await asyncio.gather(*readers, return_exceptions=True)
        assert not traffic.problems, traffic.problems[:5]
        assert set(traffic.outcomes) == {"200", "503"}, traffic.outcomes
        assert server.stop() == 0
        # (Not "no Traceback at all": google-cloud-pubsub's streaming-pull thread may log one when
        # its channel closes under a modack at shutdown.)
        assert "Task exception was never retrieved" not in server.log()
    finally:
        emulator.stop()


# -- SIGTERM with uploads, websockets and SSE in flight ----------------------------------------

GRACEFUL = 10  # seconds: Hypercorn's graceful timeout for this server (hypercorn.toml has 20)


async def trickle(
    data: bytes, step: int, go_on: asyncio.Event, sent: asyncio.Event, began: asyncio.Event
) -> AsyncIterator[bytes]:
    """Yield ``data`` in ``step`` pieces; after the first half, wait for ``go_on``."""
    half = len(data) // 2
    for start in range(0, len(data), step):
        if start >= half:
            sent.set()
            await go_on.wait()
        yield data[start : start + step]
        began.set()


def emulator_objects(emulator: StorageEmulator, bucket: str) -> dict[str, str]:
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o", timeout=WAIT) as r:
        items = json.loads(r.read()).get("items", [])
    return {item["name"]: item.get("md5Hash", "") for item in items}


async def test_sigterm_finishes_or_drops_uploads_and_exits_within_the_graceful_timeout(
    start_server: Any, storage_emulator: StorageEmulator, bucket: str, topic: Any
) -> None:
    server: Server = await start_server(
        {"STORAGE_EMULATOR_HOST": storage_emulator.url, "LOOPGATE_BUCKETS": bucket},
        args=["--graceful-timeout", str(GRACEFUL)],
    )
    data = {name: os.urandom(9 * MB) for name in ("finished", "stalled", "stalled-chunked")}
    go_on = {name: asyncio.Event() for name in data}
    halfway = {name: asyncio.Event() for name in data}
    began = {name: asyncio.Event() for name in data}
    base = f"{server.url}/v1/buckets/{bucket}/objects"

    async def upload(session: aiohttp.ClientSession, name: str) -> int | str:
        body = trickle(data[name], 256 * 1024, go_on[name], halfway[name], began[name])
        # A known length streams in one resumable request; chunked encoding goes in pieces.
        headers = {} if name.endswith("chunked") else {"Content-Length": str(len(data[name]))}
        try:
            async with session.put(f"{base}/{name}", data=body, headers=headers) as response:
                await response.read()
                return response.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.url}/v1/topics/{topic.name}/stream")
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
        events = await session.get(f"{server.url}/v1/topics/{topic.name}/events")
        await asyncio.wait_for(events.content.readline(), WAIT)
        # The storage emulator serves one request at a time, and reads an upload's body as it
        # comes: the upload that will finish goes first, so that its backend request is the one
        # being read. The others then wait for the emulator (their uploads not yet started) or,
        # once it is done, stall halfway through their bodies.
        uploads = {"finished": asyncio.create_task(upload(session, "finished"))}
        await asyncio.wait_for(halfway["finished"].wait(), WAIT)
        for name in ("stalled", "stalled-chunked"):
            uploads[name] = asyncio.create_task(upload(session, name))
        async with asyncio.timeout(WAIT):
            await asyncio.gather(began["stalled"].wait(), began["stalled-chunked"].wait())

        server.process.send_signal(signal.SIGTERM)
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001, closing
        await asyncio.wait_for(events.content.read(), WAIT)  # the SSE stream ends
        events.release()
        go_on["finished"].set()  # this client finishes its upload; the others never do
        finished = await asyncio.wait_for(uploads["finished"], WAIT)
        # The stalled uploads would hold the worker forever: it must end them at the graceful
        # timeout and exit (plus the worker's own stop and the interpreter's exit).
        code = await asyncio.to_thread(server.process.wait, GRACEFUL + WAIT)
        for event in go_on.values():
            event.set()
        stalled = await asyncio.gather(uploads["stalled"], uploads["stalled-chunked"])

    assert finished == 201
    assert code == 0
    assert all(status != 201 for status in stalled), stalled
    objects = emulator_objects(storage_emulator, bucket)
    digest = base64.b64encode(hashlib.md5(data["finished"]).digest()).decode()
    assert objects == {"finished": digest}
    # The handlers of the cut uploads were cancelled with their connections, not left running
    # into the shutdown (an orphan would log the disconnect and answer on a closed stream), and
    # nothing of the app failed (Python 3.11's asyncio itself logs the cancelled connections).
    log = server.log()
    assert "abandoned" not in log, log
    assert "Task exception was never retrieved" not in log, log
    assert "was destroyed but it is pending" not in log, log
    assert "loopgate" not in "".join(line for line in log.splitlines() if "ERROR" in line), log
