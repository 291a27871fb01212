"""Websocket, SSE and queue-mode subscribers through real Hypercorn servers and the real emulator."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    GRANIAN_GRACE,
    PROJECT,
    WAIT,
    PubSubAdmin,
    Server,
    Topic,
    clean_exits,
    graceful_timeout,
    granian_killed_a_late_worker,
    metric_value,
    spawn_server,
    subscriber_that_reads_nothing,
    wait_until_up,
)

from devtools.emulators import PubSubEmulator, free_port

pytestmark = [pytest.mark.server, pytest.mark.emulator]


async def publish(
    session: aiohttp.ClientSession, server: Server, topic: str, count: int, size: int = 8
) -> list[str]:
    ids: list[str] = []
    step = max(1, min(100, 512 * 1024 // size))
    for start in range(0, count, step):
        n = min(step, count - start)
        data = base64.b64encode(b"x" * size).decode()
        async with session.post(
            f"{server.url}/v1/topics/{topic}:publish", json={"messages": [{"data": data}] * n}
        ) as response:
            assert response.status == 200, await response.text()
            ids += (await response.json())["messageIds"]
    return ids


async def connect(
    session: aiohttp.ClientSession, server: Server, topic: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"{server.url}/v1/topics/{topic}/stream", max_msg_size=0)
    first = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert (first["type"], first["topic"], first["resumed"]) == ("subscribed", topic, False)
    return ws


class Received:
    def __init__(self) -> None:
        self.ids: list[str] = []
        self.dropped = 0
        self.close_code: int | None = None


async def receive(
    ws: aiohttp.ClientWebSocketResponse, count: int, into: Received | None = None
) -> Received:
    """Read frames until ``count`` messages (received plus reported dropped) or the close."""
    got = into or Received()
    async with asyncio.timeout(WAIT):
        while len(got.ids) + got.dropped < count:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                got.close_code = ws.close_code
                return got
            frame = json.loads(msg.data)
            if frame["type"] == "dropped":
                got.dropped += frame["count"]
            elif frame["type"] == "messages":
                got.ids += [item["messageId"] for item in frame["messages"]]
            else:
                assert frame["type"] == "message"
                got.ids.append(frame["messageId"])
    return got


def fanout_subscriptions(admin: PubSubAdmin, topic: str) -> list[str]:
    return [
        s.name
        for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})
        if "-fanout." in s.name and s.topic.endswith(f"/{topic}")
    ]


async def test_200_clients_on_one_worker_each_receive_500_messages(
    start_server: Any, topic: Topic
) -> None:
    server = await start_server()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = await asyncio.gather(*(connect(session, server, topic.name) for _ in range(200)))
        ids = await publish(session, server, topic.name, 500)
        results = await asyncio.gather(*(receive(ws, 500) for ws in sockets))
        for result in results:
            assert result.ids == ids
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_two_instances_each_deliver_what_either_published(
    start_server: Any, topic: Topic
) -> None:
    a, b = await asyncio.gather(start_server(), start_server())
    async with aiohttp.ClientSession() as session:
        sockets = [await connect(session, server, topic.name) for server in (a, b, a, b)]
        ids = await publish(session, a, topic.name, 10) + await publish(session, b, topic.name, 10)
        for ws in sockets:
            assert sorted((await receive(ws, 20)).ids) == sorted(ids)
            await ws.close()


async def test_sse_receives_the_same_messages(start_server: Any, topic: Topic) -> None:
    server = await start_server()
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, server, topic.name)
        async with session.get(f"{server.url}/v1/topics/{topic.name}/events") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            events: list[dict[str, str]] = []
            event: dict[str, str] = {}
            ids: list[str] = []
            async with asyncio.timeout(WAIT):
                async for raw in response.content:
                    line = raw.decode().rstrip("\n")
                    if line:
                        key, _, value = line.partition(": ")
                        event[key] = value
                        continue
                    if "data" in event:
                        events.append(event)
                        if json.loads(event["data"])["type"] == "subscribed":
                            ids = await publish(session, server, topic.name, 30)
                    event = {}
                    if len(events) == 31:
                        break
        frames = [json.loads(e["data"]) for e in events[1:]]
        assert [f["messageId"] for f in frames] == ids
        assert [e["id"] for e in events[1:]] == [f["id"] for f in frames]  # the resume cursors
        assert (await receive(ws, 30)).ids == ids
        await ws.close()


@pytest.mark.parametrize("policy", ["drop-oldest", "close"])
async def test_slow_consumer_per_policy_while_fast_ones_get_everything(
    start_server: Any, topic: Topic, policy: str
) -> None:
    server = await start_server(
        {"LOOPGATE_STREAM_QUEUE_SIZE": "100", "LOOPGATE_STREAM_SLOW_POLICY": policy}
    )
    size, count = 64 * 1024, 400  # 25 MiB in all: far beyond socket buffers and the queue
    async with aiohttp.ClientSession() as session:
        fast = await connect(session, server, topic.name)
        slow = await connect(session, server, topic.name)  # never reads until the end
        fast_task = asyncio.ensure_future(receive(fast, count))
        ids = await publish(session, server, topic.name, count, size=size)
        assert sorted((await fast_task).ids) == sorted(ids)
        slow_got = await receive(slow, count)
        if policy == "drop-oldest":
            assert slow_got.dropped > 0
            assert len(slow_got.ids) + slow_got.dropped == count
            assert set(slow_got.ids) <= set(ids)
        else:
            assert slow_got.close_code == 1013
            assert len(slow_got.ids) < count
        # Every message was either delivered or counted as dropped: the slow reader's backlog was
        # cut at its queue bound instead of growing.
        await fast.close()
        await slow.close()


async def test_queue_mode_redelivers_nacked_and_abandoned_messages(
    start_server: Any, topic: Topic
) -> None:
    server = await start_server({"LOOPGATE_SUBSCRIPTIONS": topic.subscription.rsplit("/", 1)[1]})
    name = topic.subscription.rsplit("/", 1)[1]
    url = f"{server.url}/v1/subscriptions/{name}/stream"
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as error:
            await session.ws_connect(f"{server.url}/v1/subscriptions/other-sub/stream")
        assert error.value.status == 404
        ws = await session.ws_connect(url)
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
        (message_id,) = await publish(session, server, topic.name, 1)
        first = await asyncio.wait_for(ws.receive_json(), WAIT)
        assert first["messageId"] == message_id and first["ackId"]
        await ws.send_json({"nack": [first["ackId"]]})
        again = await asyncio.wait_for(ws.receive_json(), WAIT)
        assert again["messageId"] == message_id
        await ws.send_json({"ack": ["not-an-ack-id"]})
        # At least once: on a loaded machine the message may come once more before the answer.
        reply = await asyncio.wait_for(ws.receive_json(), WAIT)
        while reply["type"] == "message" and reply["messageId"] == message_id:
            reply = await asyncio.wait_for(ws.receive_json(), WAIT)
        assert reply["type"] == "error"
        await ws.close()  # while holding the message without acking it
        # It comes back: the server nacks what the connection held as it closes (at the latest, the
        # lease runs out). A plain pull reads it, because the emulator does not hand a nacked
        # message to a streaming pull opened after the nack.
        # The read starts while the server is still closing the connection: the nack must reach
        # it, not a stream Pub/Sub still believes open.
        redelivered = await asyncio.to_thread(topic.received, 1, WAIT)
        assert {m.message_id for m in redelivered} == {message_id}
    assert "did not end a closed streaming pull" not in server.log()


async def queue_messages(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[dict[str, Any]]:
    frames = []
    async with asyncio.timeout(WAIT):
        while len(frames) < count:
            frame = await ws.receive_json()
            assert frame["type"] == "message", frame
            frames.append(frame)
    return frames


async def test_queue_mode_returns_everything_a_connection_at_its_cap_held(
    start_server: Any, topic: Topic
) -> None:
    name = topic.subscription.rsplit("/", 1)[1]
    server = await start_server(
        {"LOOPGATE_SUBSCRIPTIONS": name, "LOOPGATE_QUEUE_MAX_OUTSTANDING": "2"}
    )
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.url}/v1/subscriptions/{name}/stream")
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
        ids = await publish(session, server, topic.name, 6)
        held = await queue_messages(ws, 2)  # the cap: flow control holds the stream back
        assert {f["messageId"] for f in held} <= set(ids)
        await ws.close()
    # What the connection held, and what its paused stream had not handed over, all come back.
    redelivered = await asyncio.to_thread(topic.received, 6, WAIT)
    assert {m.message_id for m in redelivered} == set(ids)
    assert "did not end a closed streaming pull" not in server.log()


async def test_queue_mode_hands_an_abandoned_message_to_the_other_connection(
    start_server: Any, topic: Topic
) -> None:
    name = topic.subscription.rsplit("/", 1)[1]
    server = await start_server({"LOOPGATE_SUBSCRIPTIONS": name})
    url = f"{server.url}/v1/subscriptions/{name}/stream"
    async with aiohttp.ClientSession() as session:
        first = await session.ws_connect(url)
        assert (await asyncio.wait_for(first.receive_json(), WAIT))["type"] == "subscribed"
        (message_id,) = await publish(session, server, topic.name, 1)
        (got,) = await queue_messages(first, 1)
        assert got["messageId"] == message_id
        other = await session.ws_connect(url)
        assert (await asyncio.wait_for(other.receive_json(), WAIT))["type"] == "subscribed"
        await first.close()  # holding the message
        (again,) = await queue_messages(other, 1)
        assert again["messageId"] == message_id and again["ackId"] != got["ackId"]
        await other.send_json({"ack": [again["ackId"]]})
        await other.close()
    assert await asyncio.to_thread(topic.received, 0, 3) == []


async def test_subscription_deleted_after_last_client_and_at_shutdown(
    start_server: Any, admin: PubSubAdmin, topic: Topic, server_name: str
) -> None:
    other = admin.create_topic()
    server = await start_server({"LOOPGATE_FANOUT_GRACE": "0.5"}, server=server_name)
    async with aiohttp.ClientSession() as session:
        ws = await connect(session, server, topic.name)
        kept = await connect(session, server, other)
        assert len(fanout_subscriptions(admin, topic.name)) == 1
        await ws.close()
        async with asyncio.timeout(WAIT):
            while fanout_subscriptions(admin, topic.name):
                await asyncio.sleep(0.1)
        assert len(fanout_subscriptions(admin, other)) == 1
        server.process.send_signal(signal.SIGTERM)
        closing = await asyncio.wait_for(kept.receive(), WAIT)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await asyncio.to_thread(server.stop)
    assert server.process.returncode in clean_exits(server_name), server.log()
    assert fanout_subscriptions(admin, other) == []


async def test_sigterm_closes_websockets_with_1001_and_ends_sse(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    server = await start_server(server=server_name)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = [await connect(session, server, topic.name) for _ in range(20)]
        streams = [
            await session.get(f"{server.url}/v1/topics/{topic.name}/events") for _ in range(5)
        ]
        for events in streams:
            await asyncio.wait_for(events.content.readline(), WAIT)
        server.process.send_signal(signal.SIGTERM)
        # Every server's graceful timeout is 20 s (hypercorn.toml, devtools/servers.py): the
        # closes must come well before it.
        async with asyncio.timeout(15):
            for ws in sockets:
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001, msg
            for events in streams:
                await events.content.read()  # the SSE stream ends
        for events in streams:
            events.release()
        await asyncio.to_thread(server.stop)
    assert server.process.returncode in clean_exits(server_name), server.log()
    assert "Traceback" not in server.log()


async def test_sigterm_ends_a_worker_whose_subscriber_reads_nothing(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    # Hypercorn cancels the connection at its graceful timeout, then would wait forever to flush
    # what it holds for a client that reads nothing; the close is bounded (service/server/hypercorn/close.py).
    # On Python 3.12+ asyncio's Server.wait_closed() also waits for every connection
    # (pgjones/hypercorn#308): this test would hang there too if that bit; CI runs it on 3.13.
    # uvloop's does not wait (the loop of hypercorn.toml and of the uvicorn and Granian flags);
    # uvicorn awaits it within its graceful timeout; Granian serves connections from Rust.
    server = await start_server(
        {"LOOPGATE_STREAM_QUEUE_SIZE": "100"},
        args=graceful_timeout(server_name, 2),  # Granian's: GRANIAN_GRACE
        server=server_name,
    )
    async with aiohttp.ClientSession() as session:
        subscriber = await subscriber_that_reads_nothing(server, topic.name)

        async def dropped() -> float:
            async with session.get(f"{server.url}/metrics") as response:
                text = await response.text()
            return metric_value(
                text, "loopgate_stream_drops_total", topic=topic.name, reason="dropped"
            )

        # Messages are dropped only once the subscriber's writer is stuck on a full socket (with
        # a queue of 100, any drop means the writer is stuck): publish until they are.
        try:
            async with asyncio.timeout(WAIT):
                while await dropped() == 0:
                    await publish(session, server, topic.name, 50, size=64 * 1024)
        except TimeoutError:
            raise AssertionError(f"nothing was dropped within {WAIT}s:\n{server.log()}") from None
        assert subscriber.fileno() != -1  # still connected, taking nothing
        assert await asyncio.to_thread(server.stop) in clean_exits(server_name), server.log()
        subscriber.close()
    if server_name == "hypercorn":
        assert "reset" in server.log()
    assert not granian_killed_a_late_worker(server.log(), GRANIAN_GRACE), server.log()


async def test_clients_receive_again_after_the_emulator_restarts(
    tmp_path: Path, admin: PubSubAdmin
) -> None:
    from google.cloud import pubsub_v1

    emulator = PubSubEmulator(port=free_port())
    await asyncio.to_thread(emulator.start)
    server: Server | None = None
    publisher = None
    try:
        os.environ["PUBSUB_EMULATOR_HOST"], saved = (
            emulator.host,
            os.environ["PUBSUB_EMULATOR_HOST"],
        )
        try:
            publisher = pubsub_v1.PublisherClient()
        finally:
            os.environ["PUBSUB_EMULATOR_HOST"] = saved
        path = publisher.topic_path(PROJECT, "restart-topic")
        publisher.create_topic(name=path)
        server = spawn_server(tmp_path, {"PUBSUB_EMULATOR_HOST": emulator.host})
        await wait_until_up(server)
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, server, "restart-topic")
            first = await publish(session, server, "restart-topic", 1)
            assert (await receive(ws, 1)).ids == first
            await asyncio.to_thread(emulator.stop)
            await asyncio.to_thread(emulator.start)  # same port, empty: no topic, no subscription
            await asyncio.to_thread(publisher.create_topic, name=path)
            published: list[str] = []
            async with asyncio.timeout(60):
                while True:
                    future = publisher.publish(path, b"again")
                    published.append(await asyncio.wrap_future(future))  # type: ignore[arg-type]
                    try:
                        got = await asyncio.wait_for(receive(ws, 1), 1.0)
                        break
                    except TimeoutError:
                        continue
            assert got.ids[0] in published
            await ws.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        if publisher is not None:
            publisher.stop()
        emulator.stop()


@pytest.mark.parametrize("enabled", [False, True])
async def test_websocket_compression_is_declined_unless_enabled(
    start_server: Any,
    topic: Topic,
    enabled: bool,
    server_name: str,
    request: pytest.FixtureRequest,
) -> None:
    if enabled and server_name == "granian":
        # Granian's websockets (tungstenite, in Rust) answer every offer without the extension,
        # whatever the setting: compression cannot be turned on under Granian.
        request.applymarker(pytest.mark.xfail(strict=True, reason="granian has no compression"))
    server = await start_server(
        {"LOOPGATE_STREAM_COMPRESSION": "1" if enabled else "0"}, server=server_name
    )
    async with aiohttp.ClientSession() as session:
        # The client offers permessage-deflate, as every browser does.
        ws = await session.ws_connect(f"{server.url}/v1/topics/{topic.name}/stream", compress=15)
        try:
            assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
            assert bool(ws.compress) is enabled
            [published] = await publish(session, server, topic.name, 1)
            assert (await receive(ws, 1)).ids == [published]
        finally:
            await ws.close()
