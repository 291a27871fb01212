"""Resumable topic streams: cursor ids, the worker's recent history, catch-up from Pub/Sub's
retention, against the real emulator (Quart's test app and the app's own hub)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from conftest import PROJECT, WAIT, PubSubAdmin, make_settings, metric_value
from google.protobuf import duration_pb2
from quart import Quart
from quart.testing.connections import WebsocketResponseError

from service import create_app
from service.errors import InvalidArgument, StreamClosed, Unavailable
from service.streams.cursor import (
    MAX_LENGTH,
    Cursor,
    decode_cursor,
    encode_cursor,
    topic_tag,
)
from service.streams.feed import Feed
from service.streams.frames import Frame
from service.streams.history import History
from service.streams.hub import FANOUT, Hub
from service.streams.subscriber_queue import Listener

URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")

# -- cursors (no Pub/Sub) ---------------------------------------------------------------------


@pytest.mark.parametrize("message_id", ["1234567890123456", "a/b c+é", "x" * 300, ""])
def test_a_cursor_is_url_safe_bounded_and_reads_back(message_id: str) -> None:
    cursor = encode_cursor(topic_tag("orders"), 1_796_176_909_385_123, message_id)
    assert URL_SAFE.fullmatch(cursor) and len(cursor.encode()) <= MAX_LENGTH
    expected = message_id if len(message_id) < 100 else ""  # none or too long: a time alone
    assert decode_cursor(cursor, "orders") == Cursor(1_796_176_909_385_123, expected)


@pytest.mark.parametrize(
    "cursor", ["", "42", "1.zz.1.2", "2.00000000.1.2", "1.0000000g.1.2", "x" * 500, "1.abc.1.~!"]
)
def test_a_malformed_cursor_is_refused(cursor: str) -> None:
    with pytest.raises(InvalidArgument):
        decode_cursor(cursor, "orders")


def test_a_cursor_of_another_topic_is_refused() -> None:
    cursor = encode_cursor(topic_tag("orders"), 1, "7")
    with pytest.raises(InvalidArgument, match="another topic"):
        decode_cursor(cursor, "invoices")


# -- the recent history (no Pub/Sub) ----------------------------------------------------------


def _frame(number: int, published: float = 1000.0, size: int = 10) -> Frame:
    return Frame(str(number), "x" * size, published + number / 1000)


async def test_the_history_is_bounded_by_count_and_bytes_and_forgets_completeness() -> None:
    history = History(make_settings(stream_history_messages=3, stream_history_bytes=35))
    history.restart(since=1000.0)
    history.extend([_frame(n) for n in range(3)])
    assert [f.message_id for f in history.since(0)] == ["0", "1", "2"]
    history.extend([_frame(3, size=20)])  # 50 bytes: the two oldest go
    assert [f.message_id for f in history.since(0)] == ["2", "3"]
    assert history.complete_since > _frame(1).published  # what was forgotten is not complete
    assert history.after(Cursor(int(_frame(0).published * 1e6), "0")) is None
    after = history.after(Cursor(int(_frame(2).published * 1e6), "2"))
    assert after is not None and [f.message_id for f in after] == ["3"]


async def test_a_history_of_no_messages_serves_no_resume_by_id() -> None:
    history = History(make_settings(stream_history_messages=0))
    history.restart(since=1000.0)
    history.extend([_frame(1)])
    assert len(history) == 0
    assert history.after(Cursor(int(_frame(1).published * 1e6), "1")) in (None, [])


@pytest.mark.parametrize(
    ("messages", "size", "age", "binding"),
    [(500, 10**6, 60.0, "messages"), (10**5, 30_000, 60.0, "bytes"), (10**5, 10**6, 0.1, "age")],
)
async def test_the_history_stays_within_its_bounds_at_50000_deliveries_a_second(
    messages: int, size: int, age: float, binding: str
) -> None:
    # The feed's own path: 5,000 messages a second handed to 10 subscribers for 2 s, with one
    # bound ("binding") small enough to be reached again and again.
    settings = make_settings(
        stream_history_messages=messages,
        stream_history_bytes=size,
        stream_history_seconds=age,
        stream_queue_size=20_000,
    )
    feed = Feed("busy", "projects/p/subscriptions/s", settings)
    feed.history.restart(since=time.time())
    listeners = [
        Listener("busy", capacity=20_000, close_when_full=False, max_frame=500) for _ in range(10)
    ]
    for listener in listeners:
        feed.join(listener, [])
    received = [0] * len(listeners)
    total: list[int] = []  # set once everything is sent
    everything = asyncio.Event()  # every subscriber has received all of it

    async def consume(index: int, listener: Listener) -> None:
        while True:
            received[index] += len((await listener.get()).frames)
            if total and min(received) >= total[0]:
                everything.set()

    consumers = [asyncio.create_task(consume(i, lst)) for i, lst in enumerate(listeners)]
    loop = asyncio.get_running_loop()
    rate, seconds, sent, largest, largest_bytes, oldest_age = 5_000, 2.0, 0, 0, 0, 0.0
    start = loop.time()
    try:
        while (elapsed := loop.time() - start) < seconds:
            due = int(elapsed * rate) - sent
            length = 60 + sent % 90  # texts of 60 to 149 bytes
            frames = [Frame(str(n), "x" * length, time.time()) for n in range(sent, sent + due)]
            sent += due
            feed.fanout(frames)
            history = feed.history
            held = history.since(0)
            held_bytes = sum(len(frame.text) for frame in held)
            assert len(held) <= messages
            assert held_bytes <= size
            assert len(history._seq_of) <= len(held)  # no id outlives its frame
            if held:
                # Trimmed when frames are added: none arrived longer than ``age`` before the
                # latest (on the loop's clock, as the history keeps it; no wall-clock timing).
                arrived = [when for when, _ in history._frames]
                assert arrived[-1] - arrived[0] <= age
                oldest_age = max(oldest_age, arrived[-1] - arrived[0])
                # Completeness never claims a forgotten frame.
                assert history.complete_since <= held[0].published + 1e-6
            largest, largest_bytes = max(largest, len(held)), max(largest_bytes, held_bytes)
            await asyncio.sleep(0.005)
        total.append(sent)
        feed.flush()
        if min(received) >= sent:  # the consumers may have had everything already
            everything.set()
        await asyncio.wait_for(everything.wait(), WAIT)
    finally:
        for task in consumers:
            task.cancel()
        feed.cancel_flush()
    assert sent >= 0.9 * rate * seconds
    assert sum(received) == sent * len(listeners)  # every delivery made, none dropped
    # The binding bound was reached, not merely respected by a history that stayed small.
    reached = {
        "messages": largest == messages,
        "bytes": largest_bytes > size - 150,
        "age": oldest_age > age / 2,
    }
    assert reached[binding], (largest, largest_bytes, oldest_age)
    first = Cursor(int(feed.history.since(0)[0].published * 1e6) - 1, "0")
    assert feed.history.after(first) is None  # the forgotten first message is not served


# -- through the app and the emulator ---------------------------------------------------------


def _retained_topic(admin: PubSubAdmin, seconds: int = 3600) -> str:
    """A new topic that retains its messages (the emulator retains only when it is created so)."""
    topic = f"r-{uuid.uuid4().hex[:12]}"
    admin.publisher.create_topic(
        request={
            "name": admin.publisher.topic_path(PROJECT, topic),
            "message_retention_duration": duration_pb2.Duration(seconds=seconds),
        }
    )
    return topic


def _publish(admin: PubSubAdmin, topic: str, count: int, prefix: str = "m") -> list[str]:
    path = admin.publisher.topic_path(PROJECT, topic)
    futures = [admin.publisher.publish(path, f"{prefix}{i}".encode()) for i in range(count)]
    return [future.result(WAIT) for future in futures]


def _subscriptions_of(admin: PubSubAdmin, topic: str, kind: str) -> list[str]:
    return [
        s.name
        for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})
        if f"-{kind}." in s.name and s.topic.endswith(f"/{topic}")
    ]


async def _hub(app: Quart) -> Hub:
    registry = app.extensions["loopclients"].registry_for_running_loop()
    with registry.bind():
        return await FANOUT.get()


@contextlib.asynccontextmanager
async def _app(**overrides: Any) -> AsyncIterator[Quart]:
    app = create_app(make_settings(**overrides))
    async with app.test_app():
        yield app


async def _messages(ws: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` messages of a websocket, whether sent alone or several in a frame."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        while len(got) < count:
            frame = json.loads(await ws.receive())
            if frame["type"] == "messages":
                got += frame["messages"]
            else:
                assert frame["type"] == "message", frame
                got.append(frame)
    return got


async def _seen_on_a_first_app(admin: PubSubAdmin) -> tuple[str, Frame]:
    """A topic with retention, and the one message a subscriber of a first app received on it
    (that app then gone): what a client resuming from its last message starts from."""
    topic = _retained_topic(admin)
    async with _app() as app:
        hub = await _hub(app)
        async with hub.subscribe(topic) as listener:
            _publish(admin, topic, 1, prefix="seen")
            [seen] = await _collect(listener, 1)
    return topic, seen


async def _collect(listener: Listener, count: int) -> list[Frame]:
    frames: list[Frame] = []
    async with asyncio.timeout(WAIT):
        while len(frames) < count:
            frames += (await listener.get()).frames
    return frames


async def test_every_message_carries_a_decodable_cursor_on_websocket_and_sse(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = admin.create_topic()
    async with _app() as app:
        client = app.test_client()
        async with client.websocket(f"/v1/topics/{topic}/stream") as ws:
            assert json.loads(await ws.receive())["resumed"] is False
            ids = _publish(admin, topic, 3)
            messages = await _messages(ws, 3)
        assert [m["messageId"] for m in messages] == ids
        for message in messages:
            assert decode_cursor(message["id"], topic).message_id == message["messageId"]
        async with client.request(f"/v1/topics/{topic}/events") as sse:
            await sse.send_complete()
            text = ""
            async with asyncio.timeout(WAIT):
                while "subscribed" not in text:
                    text += (await sse.receive()).decode()
                more = _publish(admin, topic, 2)
                while text.count('"type":"message"') < 2:
                    text += (await sse.receive()).decode()
            await sse.disconnect()
    events = [block for block in text.split("\n\n") if block.startswith("id: ")]
    for event, message_id in zip(events, more, strict=True):
        cursor = event.split("\n", 1)[0].removeprefix("id: ")
        assert json.loads(event.split("data: ", 1)[1])["id"] == cursor
        assert decode_cursor(cursor, topic).message_id == message_id


@pytest.mark.parametrize("foreign", [False, True])
async def test_a_malformed_or_foreign_cursor_is_refused_with_400(
    pubsub_emulator: Any, admin: PubSubAdmin, foreign: bool
) -> None:
    topic = admin.create_topic()
    cursor = encode_cursor(topic_tag("another-topic"), 1, "1") if foreign else "not-a-cursor"
    async with _app() as app:
        client = app.test_client()
        with pytest.raises(WebsocketResponseError) as error:
            async with client.websocket(f"/v1/topics/{topic}/stream?lastEventId={cursor}") as ws:
                await asyncio.wait_for(ws.receive(), WAIT)
        assert error.value.response.status_code == 400
        body = await error.value.response.get_json()
        assert body["error"]["status"] == "INVALID_ARGUMENT"
        path = f"/v1/topics/{topic}/events"
        for response in (
            await client.get(path, headers={"Last-Event-ID": cursor}),
            await client.get(path, query_string={"lastEventId": cursor}),
        ):
            assert response.status_code == 400
            assert (await response.get_json())["error"]["status"] == "INVALID_ARGUMENT"
        hub = await _hub(app)
        assert hub.feed(topic) is None  # refused before subscribing


async def test_a_reconnect_to_the_same_worker_is_served_from_its_history(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    async with _app(fanout_grace=60) as app:
        client = app.test_client()
        async with client.websocket(f"/v1/topics/{topic}/stream") as ws:
            await ws.receive()
            _publish(admin, topic, 3)
            first = await _messages(ws, 3)
        subscriptions = _subscriptions_of(admin, topic, "fanout")
        hub = await _hub(app)
        feed = hub.feed(topic)
        assert feed is not None and len(subscriptions) == 1
        missed = _publish(admin, topic, 5, prefix="away")
        async with asyncio.timeout(WAIT):  # the worker has them (acked: no subscriber here)
            while len(feed.history) < 8:
                await asyncio.sleep(0.02)
        cursor = first[-1]["id"]
        async with client.websocket(f"/v1/topics/{topic}/stream?lastEventId={cursor}") as ws:
            subscribed = json.loads(await ws.receive())
            replayed = await _messages(ws, 5)
            live = _publish(admin, topic, 2, prefix="live")
            after = await _messages(ws, 2)
        assert subscribed == {
            "type": "subscribed",
            "topic": topic,
            "id": cursor,
            "resumed": True,
            "complete": True,
        }
        assert [m["messageId"] for m in replayed] == missed
        assert [m["messageId"] for m in after] == live
        assert _subscriptions_of(admin, topic, "fanout") == subscriptions  # no new subscription
        assert _subscriptions_of(admin, topic, "catchup") == []
        assert hub.subscriptions.catchups_created == 0


async def test_a_new_subscription_of_a_retained_topic_receives_no_old_messages(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    _publish(admin, topic, 20, prefix="old")  # retained by the topic
    async with _app() as app:
        hub = await _hub(app)
        async with hub.subscribe(topic) as listener:
            new = _publish(admin, topic, 1, prefix="new")
            [frame] = await _collect(listener, 1)
            assert frame.message_id == new[0]
            assert len(listener) == 0 and listener.backlog == 0


async def test_a_resume_after_a_restart_comes_from_the_topics_retention(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    async with _app() as app:
        async with app.test_client().websocket(f"/v1/topics/{topic}/stream") as ws:
            await ws.receive()
            before = _publish(admin, topic, 4, prefix="before")
            seen = await _messages(ws, 4)
    assert [m["messageId"] for m in seen] == before
    missed = _publish(admin, topic, 30, prefix="missed")  # while no worker has a subscription
    async with _app() as app:  # a new worker: nothing of the topic in its history
        client = app.test_client()
        cursor = seen[-1]["id"]
        async with client.websocket(f"/v1/topics/{topic}/stream?lastEventId={cursor}") as ws:
            subscribed = json.loads(await ws.receive())
            replayed: list[str] = []
            async with asyncio.timeout(WAIT):
                while not set(missed) <= set(replayed):
                    replayed += [m["messageId"] for m in await _messages(ws, 1)]
            live = _publish(admin, topic, 3, prefix="live")
            got: list[str] = []
            async with asyncio.timeout(WAIT):  # duplicates near the seam may come first
                while not set(live) <= set(got):
                    got += [m["messageId"] for m in await _messages(ws, 1)]
        hub = await _hub(app)
        assert hub.subscriptions.catchups_created == 1
        async with asyncio.timeout(WAIT):  # deleted once caught up
            while _subscriptions_of(admin, topic, "catchup"):
                await asyncio.sleep(0.05)
    assert subscribed["resumed"] is True and subscribed["complete"] is True
    # In order; what else comes is a duplicate from near the cursor (its slack) or the seam.
    assert [i for i in replayed if i in missed] == missed
    assert set(replayed) <= set(before) | set(missed)
    assert set(got) <= set(before) | set(missed) | set(live)


async def test_without_retention_a_resume_is_incomplete_then_live(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = admin.create_topic()
    async with _app() as app:
        async with app.test_client().websocket(f"/v1/topics/{topic}/stream") as ws:
            await ws.receive()
            _publish(admin, topic, 2)
            seen = await _messages(ws, 2)
    _publish(admin, topic, 5, prefix="lost")
    async with _app() as app:
        client = app.test_client()
        cursor = seen[-1]["id"]
        async with client.websocket(f"/v1/topics/{topic}/stream?lastEventId={cursor}") as ws:
            subscribed = json.loads(await ws.receive())
            live = _publish(admin, topic, 2, prefix="live")
            got = await _messages(ws, 2)
        assert (await _hub(app)).subscriptions.catchups_created == 0
    assert subscribed["resumed"] is True and subscribed["complete"] is False
    assert subscribed["earliest"].endswith("Z")
    assert [m["messageId"] for m in got] == live


async def test_a_resume_storm_makes_one_catch_up_subscription(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    async with _app() as app:
        hub = await _hub(app)
        async with hub.subscribe(topic) as listener:
            first = _publish(admin, topic, 1, prefix="first")
            [seen] = await _collect(listener, 1)
    assert seen.message_id == first[0]
    missed = _publish(admin, topic, 40, prefix="missed")
    cursor = decode_cursor(seen.cursor, topic)
    most = 0
    async with _app() as app, contextlib.AsyncExitStack() as stack:
        hub = await _hub(app)

        async def resume() -> Listener:
            return await stack.enter_async_context(hub.subscribe(topic, cursor=cursor))

        listeners = await asyncio.gather(*(resume() for _ in range(60)))

        async def caught_up(listener: Listener) -> list[str]:
            ids: list[str] = []
            async with asyncio.timeout(WAIT):
                while not set(missed) <= set(ids):
                    ids += [f.message_id for f in (await listener.get()).frames]
            return ids

        watching = asyncio.ensure_future(asyncio.gather(*(caught_up(x) for x in listeners)))
        while not watching.done():
            most = max(most, len(_subscriptions_of(admin, topic, "catchup")))
            await asyncio.wait({watching}, timeout=0.05)
        results = await watching
        assert hub.subscriptions.catchups_created == 1
    assert all(x.resumption.resumed and x.resumption.complete for x in listeners)
    assert most <= 1
    for ids in results:
        assert [i for i in ids if i in missed] == missed


@pytest.mark.timeout(240)
async def test_a_storm_of_1000_websockets_resuming_on_a_real_server_makes_one_catch_up(
    start_server: Any, admin: PubSubAdmin
) -> None:
    # A deploy: 1,000 websockets come back at once to a fresh worker, with a cursor that its
    # history cannot serve. One catch-up subscription exists at a time, and every one catches up.
    topic = _retained_topic(admin)
    old = await start_server()
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{old.url}/v1/topics/{topic}/stream") as ws:
            await asyncio.wait_for(ws.receive_json(), WAIT)
            first = _publish(admin, topic, 1, prefix="first")
            frame = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert frame["messageId"] == first[0]
    await asyncio.to_thread(old.stop)
    missed = _publish(admin, topic, 40, prefix="missed")
    new = await start_server(env={"LOOPGATE_STREAM_MAX_CONNECTIONS": "2000"})
    url = f"{new.url}/v1/topics/{topic}/stream?lastEventId={frame['id']}"
    most, names = 0, set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def resume() -> tuple[dict[str, Any], list[str]]:
            async with session.ws_connect(url) as ws:
                subscribed = await ws.receive_json()
                ids: list[str] = []
                while not set(missed) <= set(ids):
                    message = await ws.receive_json()
                    items = message["messages"] if message["type"] == "messages" else [message]
                    ids += [m["messageId"] for m in items if m["type"] == "message"]
                return subscribed, ids

        async def everyone() -> list[tuple[dict[str, Any], list[str]]]:
            return await asyncio.gather(*(resume() for _ in range(1000)))

        watching = asyncio.create_task(everyone())
        async with asyncio.timeout(120):
            while not watching.done():
                catchups = await asyncio.to_thread(_subscriptions_of, admin, topic, "catchup")
                most, names = max(most, len(catchups)), names | set(catchups)
                await asyncio.wait({watching}, timeout=0.05)
            results = await watching
        async with session.get(f"{new.url}/metrics") as response:
            made = metric_value(
                await response.text(), "loopgate_stream_catchups_total", topic=topic
            )
    assert len(results) == 1000
    # One at a time (the poll may miss a short one), made at least once, and in rounds that
    # serve everyone waiting: not one per client.
    assert most <= 1 and len(names) <= 1
    assert 1 <= made <= 10, made
    for subscribed, ids in results:
        assert subscribed["resumed"] is True and subscribed["complete"] is True
        assert [i for i in ids if i in missed] == missed


@pytest.mark.parametrize(("slack", "history"), [(5.0, 10_000), (0.0, 10_000), (0.0, 5)])
async def test_nothing_published_while_a_catch_up_runs_is_lost_at_the_seam(
    pubsub_emulator: Any,
    admin: PubSubAdmin,
    slack: float,
    history: int,
) -> None:
    # Without slack, what is published after the catch-up began reaches the resumed stream
    # only through the history it joins; a history too small to hold it makes the catch-up go on.
    topic, seen = await _seen_on_a_first_app(admin)
    missed = _publish(admin, topic, 50, prefix="missed")
    async with _app(stream_history_messages=history, stream_resume_slack=slack) as app:
        hub = await _hub(app)
        async with (
            hub.subscribe(topic) as live,
            hub.subscribe(topic, cursor=decode_cursor(seen.cursor, topic)) as resuming,
        ):
            assert resuming.resumption.complete
            # Published while the catch-up runs, and after it: each exactly once in the live
            # stream, and in the resumed one at least once.
            during = await asyncio.to_thread(_publish, admin, topic, 20, "during")
            ids: list[str] = []
            async with asyncio.timeout(WAIT):
                while not set(missed) | set(during) <= set(ids):
                    ids += [f.message_id for f in (await resuming.get()).frames]
            after = await asyncio.to_thread(_publish, admin, topic, 5, "after")
            async with asyncio.timeout(WAIT):
                while not set(after) <= set(ids):
                    ids += [f.message_id for f in (await resuming.get()).frames]
            live_ids = [f.message_id for f in await _collect(live, 25)]
    assert [i for i in ids if i in missed] == missed
    assert sorted(live_ids) == sorted(during + after)  # not delayed or disturbed by the replay
    assert set(ids) <= {seen.message_id, *missed, *during, *after}


async def test_an_event_source_resumes_with_its_last_event_id_header(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = admin.create_topic()
    async with _app(fanout_grace=60) as app:
        hub = await _hub(app)
        async with hub.subscribe(topic) as listener:
            _publish(admin, topic, 1)
            [seen] = await _collect(listener, 1)
        feed = hub.feed(topic)
        assert feed is not None
        missed = _publish(admin, topic, 3, prefix="away")
        async with asyncio.timeout(WAIT):
            while len(feed.history) < 4:
                await asyncio.sleep(0.02)
        client = app.test_client()
        headers = {"Last-Event-ID": seen.cursor}
        async with client.request(f"/v1/topics/{topic}/events", headers=headers) as sse:
            await sse.send_complete()
            text = ""
            async with asyncio.timeout(WAIT):
                while text.count('"type":"message"') < 3:
                    text += (await sse.receive()).decode()
            await sse.disconnect()
    subscribed = json.loads(text.split("data: ", 1)[1].split("\n", 1)[0])
    assert subscribed["resumed"] is True and subscribed["complete"] is True
    events = [block for block in text.split("\n\n") if block.startswith("id: ")]
    assert [json.loads(e.split("data: ", 1)[1])["messageId"] for e in events] == missed


async def test_a_shutdown_during_a_catch_up_deletes_its_subscription(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic, seen = await _seen_on_a_first_app(admin)
    _publish(admin, topic, 5, prefix="missed")
    async with _app() as app:
        hub = await _hub(app)
        async with hub.subscribe(topic, cursor=decode_cursor(seen.cursor, topic)) as resuming:
            await asyncio.wait_for(resuming.get(), WAIT)  # the catch-up has begun
            hub.gate.close("test")
            with pytest.raises(StreamClosed) as closed:
                async with asyncio.timeout(WAIT):
                    while True:
                        await resuming.get()
            assert closed.value.code == 1001
    assert hub.running_tasks == 0
    assert _subscriptions_of(admin, topic, "catchup") == []


async def test_a_websocket_closed_by_a_deploy_resumes_on_the_next_server(
    start_server: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    old = await start_server()
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{old.url}/v1/topics/{topic}/stream")
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["complete"] is True
        before = _publish(admin, topic, 3, prefix="before")
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            while len(seen) < 3:
                frame = await ws.receive_json()
                seen += frame["messages"] if frame["type"] == "messages" else [frame]
        assert [m["messageId"] for m in seen] == before
        old.process.send_signal(signal.SIGTERM)  # a deploy: the old instance closes with 1001
        closing = await asyncio.wait_for(ws.receive(), WAIT)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001
        await asyncio.to_thread(old.stop)
        missed = _publish(admin, topic, 10, prefix="missed")
        new = await start_server()
        url = f"{new.url}/v1/topics/{topic}/stream?lastEventId={seen[-1]['id']}"
        async with session.ws_connect(url) as ws:
            subscribed = await asyncio.wait_for(ws.receive_json(), WAIT)
            ids: list[str] = []
            async with asyncio.timeout(WAIT):
                while not set(missed) <= set(ids):
                    frame = await ws.receive_json()
                    items = frame["messages"] if frame["type"] == "messages" else [frame]
                    ids += [m["messageId"] for m in items]
    assert subscribed["resumed"] is True and subscribed["complete"] is True
    assert [i for i in ids if i in missed] == missed
    assert set(ids) <= set(before) | set(missed)


async def test_a_failed_catch_up_closes_with_1013_so_the_client_resumes_again(
    pubsub_emulator: Any, admin: PubSubAdmin, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic, seen = await _seen_on_a_first_app(admin)
    _publish(admin, topic, 3, prefix="missed")
    async with _app() as app:
        hub = await _hub(app)

        seek = hub.subscriptions.seek

        async def seek_fails(path: str, moment: float, *, topic: str) -> None:
            if "-catchup." in path:  # the fan-out's own seek (the emulator's) still works
                raise Unavailable("Pub/Sub is down")
            await seek(path, moment, topic=topic)

        monkeypatch.setattr(hub.subscriptions, "seek", seek_fails)
        async with hub.subscribe(topic, cursor=decode_cursor(seen.cursor, topic)) as resuming:
            with pytest.raises(StreamClosed) as closed:
                await asyncio.wait_for(resuming.get(), WAIT)
        assert closed.value.code == 1013
        async with asyncio.timeout(WAIT):
            while _subscriptions_of(admin, topic, "catchup"):
                await asyncio.sleep(0.05)


async def test_a_client_that_reconnects_before_its_first_message_resumes_from_subscribed(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = _retained_topic(admin)
    async with _app(fanout_grace=60) as app:
        client = app.test_client()
        async with client.websocket(f"/v1/topics/{topic}/stream") as ws:
            start = json.loads(await ws.receive())["id"]
        missed = _publish(admin, topic, 3)
        async with client.websocket(f"/v1/topics/{topic}/stream?lastEventId={start}") as ws:
            subscribed = json.loads(await ws.receive())
            got: list[str] = []
            async with asyncio.timeout(WAIT):  # duplicates near the seam may come too
                while not set(missed) <= set(got):
                    got += [m["messageId"] for m in await _messages(ws, 1)]
    assert subscribed["id"] == start
    # The feed is new: its history does not reach back before the cursor, Pub/Sub's retention
    # does.
    assert subscribed["resumed"] is True and subscribed["complete"] is True
    assert [i for i in got if i in missed][:3] == missed
