"""The fan-out hub against the real Pub/Sub emulator, in process (Quart's test app)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import PROJECT, WAIT, PubSubAdmin, Topic, make_settings
from quart import Quart
from quart.testing.connections import WebsocketResponseError

from service import create_app
from service.config import Settings
from service.errors import StreamClosed, TopicNotFound
from service.streams.cursor import decode_cursor
from service.streams.feed import Feed
from service.streams.frames import Frame
from service.streams.hub import FANOUT, Hub
from service.streams.subscriber_queue import Listener


@pytest.fixture
def settings() -> Settings:
    return make_settings(fanout_grace=0.2)


async def _hub(app: Quart) -> Hub:
    registry = app.extensions["loopclients"].registry_for_running_loop()
    with registry.bind():
        return await FANOUT.get()


def _fanout_subscriptions(admin: PubSubAdmin, hub: Hub, topic: str) -> list[str]:
    return [
        s.name
        for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})
        if s.name.rsplit("/", 1)[-1].startswith(hub.subscriptions.prefix)
        and s.topic.endswith(f"/{topic}")
    ]


def _subscription_of(hub: Hub, topic: str) -> str:
    feed = hub.feed(topic)
    assert feed is not None
    return feed.subscription


def _publish(admin: PubSubAdmin, topic: str, count: int, prefix: str = "m") -> list[str]:
    path = admin.publisher.topic_path(PROJECT, topic)
    futures = [admin.publisher.publish(path, f"{prefix}{i}".encode()) for i in range(count)]
    return [future.result(WAIT) for future in futures]


async def _collect(listener: Listener, count: int) -> list[str]:
    ids: list[str] = []
    async with asyncio.timeout(WAIT):
        while len(ids) < count:
            batch = await listener.get()
            ids.extend(frame.message_id for frame in batch.frames)
    return ids


async def test_websocket_through_test_client(client: Any, topic: Topic) -> None:
    async with client.websocket(f"/v1/topics/{topic.name}/stream") as ws:
        subscribed = json.loads(await ws.receive())
        assert subscribed == {
            "type": "subscribed",
            "topic": topic.name,
            "id": subscribed["id"],
            "resumed": False,
            "complete": True,
        }
        assert decode_cursor(subscribed["id"], topic.name).message_id == ""  # a time alone
        response = await client.post(
            f"/v1/topics/{topic.name}:publish",
            json={
                "messages": [{"data": base64.b64encode(b"x").decode(), "attributes": {"k": "v"}}]
            },
        )
        ids = (await response.get_json())["messageIds"]
        async with asyncio.timeout(WAIT):
            frame = json.loads(await ws.receive())
    assert frame["type"] == "message"
    assert frame["messageId"] == ids[0]
    assert decode_cursor(frame["id"], topic.name).message_id == ids[0]
    assert base64.b64decode(frame["data"]) == b"x"
    assert frame["attributes"] == {"k": "v"}
    assert frame["publishTime"].endswith("Z")


async def test_unknown_topic_is_rejected_before_upgrade(client: Any, pubsub_emulator: Any) -> None:
    with pytest.raises(WebsocketResponseError) as error:
        async with client.websocket("/v1/topics/missing-topic/stream") as ws:
            await asyncio.wait_for(ws.receive(), WAIT)
    assert error.value.response.status_code == 404
    body = await error.value.response.get_json()
    assert body["error"]["status"] == "NOT_FOUND"


async def test_topic_outside_allowlist_is_not_served(pubsub_emulator: Any, topic: Topic) -> None:
    app = create_app(make_settings(topics="other-topic"))
    async with app.test_app():
        with pytest.raises(WebsocketResponseError) as error:
            async with app.test_client().websocket(f"/v1/topics/{topic.name}/stream") as ws:
                await asyncio.wait_for(ws.receive(), WAIT)
    assert error.value.response.status_code == 404


async def test_one_subscription_shared_then_deleted_after_grace(
    app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    hub = await _hub(app)
    async with hub.subscribe(topic.name) as first, hub.subscribe(topic.name) as second:
        names = _fanout_subscriptions(admin, hub, topic.name)
        feed = hub.feed(topic.name)
        assert feed is not None
        assert names == [feed.subscription]
        sub = admin.subscriber.get_subscription(request={"subscription": names[0]})
        assert sub.labels["loopgate"] == "fanout"
        assert sub.labels["pid"] == str(os.getpid())
        assert sub.expiration_policy.ttl.total_seconds() == 24 * 3600
        assert sub.message_retention_duration.total_seconds() == 600
        ids = _publish(admin, topic.name, 20)
        assert await _collect(first, 20) == ids
        assert await _collect(second, 20) == ids
    async with asyncio.timeout(WAIT):
        while _fanout_subscriptions(admin, hub, topic.name):
            await asyncio.sleep(0.1)


async def test_subscriber_during_grace_keeps_the_subscription(
    app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    hub = await _hub(app)
    async with hub.subscribe(topic.name):
        feed = hub.feed(topic.name)
    async with hub.subscribe(topic.name) as listener:
        # Another topic's grace period, begun later, ends later: once it has ended, so has the
        # first one's.
        other = admin.create_topic()
        async with hub.subscribe(other):
            pass
        async with asyncio.timeout(WAIT):
            while hub.feed(other) is not None:
                await asyncio.sleep(0.05)
        assert hub.feed(topic.name) is feed
        assert _fanout_subscriptions(admin, hub, topic.name)
        ids = _publish(admin, topic.name, 3)
        assert await _collect(listener, 3) == ids


@pytest.mark.parametrize("moment", ["while it is retired", "after it was retired"])
async def test_a_topic_joined_again_as_its_feed_is_retired_loses_nothing(
    app: Quart, admin: PubSubAdmin, topic: Topic, moment: str
) -> None:
    hub = await _hub(app)
    async with hub.subscribe(topic.name) as listener:
        warm = _publish(admin, topic.name, 5, prefix="warm")
        assert await _collect(listener, 5) == warm
    async with asyncio.timeout(WAIT):
        while hub.feed(topic.name) is not None:  # the grace period is over: retiring begins
            await asyncio.sleep(0.01)
        while moment == "after it was retired" and _fanout_subscriptions(admin, hub, topic.name):
            await asyncio.sleep(0.05)
    async with hub.subscribe(topic.name) as listener:
        ids = _publish(admin, topic.name, 300)
        assert sorted(await _collect(listener, 300)) == sorted(ids)


async def test_missing_topic_raises(app: Quart) -> None:
    hub = await _hub(app)
    with pytest.raises(TopicNotFound):
        async with hub.subscribe("no-such-topic"):
            pass


async def test_stream_resumes_after_its_subscription_is_deleted(
    app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    hub = await _hub(app)
    async with hub.subscribe(topic.name) as listener:
        first = _publish(admin, topic.name, 1)
        assert await _collect(listener, 1) == first
        admin.subscriber.delete_subscription(
            request={"subscription": _subscription_of(hub, topic.name)}
        )
        # Pub/Sub keeps nothing for a subscription that does not exist: publish until the
        # recreated subscription delivers again.
        again: list[str] = []
        async with asyncio.timeout(WAIT):
            while True:
                again += _publish(admin, topic.name, 1, prefix="again")
                try:
                    async with asyncio.timeout(1.0):
                        got = await _collect(listener, 1)
                    break
                except TimeoutError:
                    continue
        assert got[0] in again


@pytest.fixture
async def close_app(pubsub_emulator: Any) -> AsyncIterator[Quart]:
    app = create_app(make_settings(stream_queue_size=5, stream_slow_policy="close"))
    async with app.test_app():
        yield app


async def test_full_queue_closes_with_policy_close_and_others_get_everything(
    close_app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    hub = await _hub(close_app)
    async with hub.subscribe(topic.name) as slow, hub.subscribe(topic.name) as fast:
        ids = _publish(admin, topic.name, 4)
        assert await _collect(fast, 4) == ids
        more = _publish(admin, topic.name, 4)
        assert await _collect(fast, 4) == more
        assert slow.closed is not None and slow.closed.code == 1013
        assert len(slow) == 0


async def test_shutdown_closes_subscribers_with_1001_and_deletes(
    pubsub_emulator: Any, admin: PubSubAdmin, topic: Topic
) -> None:
    app = create_app(make_settings())
    async with app.test_app():
        hub = await _hub(app)
        async with hub.subscribe(topic.name) as listener:
            hub.gate.close("test")
            with pytest.raises(StreamClosed) as closed:
                await asyncio.wait_for(listener.get(), WAIT)
            assert closed.value.code == 1001
        async with asyncio.timeout(WAIT):
            while _fanout_subscriptions(admin, hub, topic.name):
                await asyncio.sleep(0.1)
    assert hub.running_tasks == 0


def _frame(number: int) -> Frame:
    text = json.dumps({"type": "message", "messageId": str(number)}, separators=(",", ":"))
    return Frame(str(number), text, 0.0)


class _Received:
    """Stands for a Pub/Sub message of the streaming pull: records its ack."""

    def __init__(self) -> None:
        self.acked = False

    def ack(self) -> None:
        self.acked = True


async def test_messages_of_a_topic_without_subscribers_here_are_acked_at_once(
    app: Quart, topic: Topic
) -> None:
    hub = await _hub(app)
    async with hub.subscribe(topic.name):
        pass
    in_grace, never_subscribed = _Received(), _Received()
    hub.fanout(topic.name, [_frame(1)], [in_grace])
    hub.fanout("never-subscribed", [_frame(2)], [never_subscribed])
    assert in_grace.acked and never_subscribed.acked


@contextlib.asynccontextmanager
async def _pulled(topic: str, count: int) -> AsyncIterator[tuple[Hub, Feed, list[Listener]]]:
    """A started app's hub whose coalescing window is far longer than any test, with ``count``
    subscribers of ``topic``, its streaming pull running."""
    # The window is subscribers / stream_frame_rate seconds, at most stream_max_coalesce_delay.
    settings = make_settings(stream_frame_rate=0.001, stream_max_coalesce_delay=60)
    app = create_app(settings)
    async with app.test_app(), contextlib.AsyncExitStack() as stack:
        hub = await _hub(app)
        listeners = [await stack.enter_async_context(hub.subscribe(topic)) for _ in range(count)]
        feed = hub.feed(topic)
        assert feed is not None and feed.pull is not None
        await asyncio.wait_for(feed.pull.running.wait(), WAIT)
        yield hub, feed, listeners


def _end_window(feed: Feed) -> None:
    """Run the scheduled hand-over now instead of at its window's end."""
    assert feed.flush_scheduled
    feed.cancel_flush()
    feed.flush()


def _wait_for_hand_over_while_busy(feed: Feed) -> None:
    """Block the loop, as a round of writes does, until the stream thread has handed a message
    over (its wake-up cannot run meanwhile)."""
    pull = feed.pull
    assert pull is not None
    deadline = time.monotonic() + WAIT
    while not pull.arrived:
        assert time.monotonic() < deadline, "no message reached the stream thread"
        time.sleep(0.01)


async def test_a_message_arriving_during_a_round_of_writes_joins_that_round(
    pubsub_emulator: Any, admin: PubSubAdmin, topic: Topic
) -> None:
    async with _pulled(topic.name, 3) as (hub, feed, (first, second, idle)):
        hub.fanout(topic.name, [_frame(1)])  # a round starts: all are woken
        done = await asyncio.wait_for(first.get(), WAIT)  # the first has written its frame
        assert [f.message_id for f in (await asyncio.wait_for(idle.get(), WAIT)).frames] == ["1"]
        waiting = asyncio.ensure_future(idle.get())  # written too: it waits for the bell again
        await asyncio.sleep(0)
        [published] = _publish(admin, topic.name, 1)
        _wait_for_hand_over_while_busy(feed)
        # The second, further along the round, sends the newcomer in the same frame (its
        # queue is not empty: get() returns without giving the loop a turn)...
        joined = await second.get()
        # ...and the first has it queued for when the round ends...
        assert len(first) == 1
        late = await asyncio.wait_for(first.get(), WAIT)
        # ...when the bell wakes the one that was waiting for it.
        _end_window(feed)  # the round's end
        woken = await asyncio.wait_for(waiting, WAIT)
    assert [f.message_id for f in done.frames] == ["1"]
    assert [f.message_id for f in joined.frames] == ["1", published]
    assert joined.chunk is not None  # one text for every connection in that position
    assert [f.message_id for f in late.frames] == [published]
    assert [f.message_id for f in woken.frames] == [published]


async def test_a_round_takes_what_the_stream_thread_handed_over_before_its_wake_up_ran(
    pubsub_emulator: Any, admin: PubSubAdmin, topic: Topic
) -> None:
    # A busy loop runs a due flush before the wake-up the stream thread scheduled.
    async with _pulled(topic.name, 2) as (_, feed, listeners):
        [published] = _publish(admin, topic.name, 1)
        _wait_for_hand_over_while_busy(feed)
        feed.flush()
        assert feed.pull is not None and not feed.pull.arrived
        async with asyncio.timeout(WAIT):  # the wake-up would leave it for the next window
            batches = [await listener.get() for listener in listeners]
    assert [[f.message_id for f in b.frames] for b in batches] == [[published], [published]]
