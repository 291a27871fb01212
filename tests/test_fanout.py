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
from service.streams.hub import FANOUT, Hub
from service.streams.subscriber_queue import Bell, Frame, Listener, websocket_texts


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
        if s.name.rsplit("/", 1)[-1].startswith(hub.prefix) and s.topic.endswith(f"/{topic}")
    ]


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
        assert json.loads(await ws.receive()) == {"type": "subscribed", "topic": topic.name}
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
        assert names == [hub.subscription_path(topic.name)]
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
        pass
    async with hub.subscribe(topic.name) as listener:
        await asyncio.sleep(0.4)  # longer than the grace period: the subscription must survive
        assert _fanout_subscriptions(admin, hub, topic.name)
        ids = _publish(admin, topic.name, 3)
        assert await _collect(listener, 3) == ids


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
            request={"subscription": hub.subscription_path(topic.name)}
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


async def test_sweep_deletes_own_leftovers_only(
    app: Quart, admin: PubSubAdmin, topic: Topic
) -> None:
    hub = await _hub(app)
    dead_pid = 2**22 + 12345  # above Linux's pid_max default: no such process
    mine = f"{hub.prefix}{hub.host}.{dead_pid}.abcdef.{topic.name}"
    alive = f"{hub.prefix}{hub.host}.{os.getppid()}.abcdef.{topic.name}"
    other_host = f"{hub.prefix}elsewhere.{dead_pid}.abcdef.{topic.name}"
    unrelated = f"someone-else.{hub.host}.{dead_pid}.abcdef.{topic.name}"
    paths = [
        admin.subscriber.subscription_path(PROJECT, n) for n in (mine, alive, other_host, unrelated)
    ]
    for path in paths:
        admin.subscriber.create_subscription(
            request={"name": path, "topic": admin.publisher.topic_path(PROJECT, topic.name)}
        )
    deleted = await hub.sweep()
    assert deleted == [paths[0]]
    remaining = {
        s.name
        for s in admin.subscriber.list_subscriptions(request={"project": f"projects/{PROJECT}"})
    }
    assert paths[0] not in remaining
    assert set(paths[1:]) <= remaining
    for path in paths[1:]:
        admin.subscriber.delete_subscription(request={"subscription": path})


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
    assert not hub._tasks


def _frame(number: int) -> Frame:
    text = json.dumps({"type": "message", "messageId": str(number)}, separators=(",", ":"))
    return Frame(str(number), text, 0.0)


@contextlib.asynccontextmanager
async def _windowed_hub(**overrides: Any) -> AsyncIterator[Hub]:
    """A started app's hub whose coalescing window is far longer than any test."""
    settings = make_settings(stream_frame_rate=1, stream_max_coalesce_delay=60, **overrides)
    app = create_app(settings)
    async with app.test_app():
        yield await _hub(app)


def _end_window(hub: Hub, topic: str) -> None:
    """Run the topic's scheduled hand-over now instead of at its window's end."""
    feed = hub._feeds[topic]
    assert feed.flush is not None
    feed.flush.cancel()
    hub._flush(feed)


async def test_messages_arriving_together_share_one_frame_built_once(
    pubsub_emulator: Any, topic: Topic
) -> None:
    # What arrives after the first flush waits for the next.
    async with _windowed_hub() as hub:
        async with hub.subscribe(topic.name) as first, hub.subscribe(topic.name) as second:
            hub.fanout(topic.name, [_frame(1)])  # after a quiet spell: handed over at once
            hub.fanout(topic.name, [_frame(2)])
            hub.fanout(topic.name, [_frame(3)])
            for listener in (first, second):
                batch = await asyncio.wait_for(listener.get(), WAIT)
                assert [f.message_id for f in batch.frames] == ["1"]
                assert len(listener) == 0
            _end_window(hub, topic.name)
            batches = [await asyncio.wait_for(x.get(), WAIT) for x in (first, second)]
    assert [[f.message_id for f in b.frames] for b in batches] == [["2", "3"], ["2", "3"]]
    texts = [websocket_texts(b) for b in batches]
    assert texts[0][0] is texts[1][0]  # one text for both connections
    assert json.loads(texts[0][0]) == {
        "type": "messages",
        "messages": [{"type": "message", "messageId": "2"}, {"type": "message", "messageId": "3"}],
    }


async def test_cancelling_one_waiting_subscriber_does_not_disturb_the_others() -> None:
    bell = Bell()
    listeners = [
        Listener("t", capacity=10, close_when_full=False, max_frame=10, bell=bell) for _ in "ab"
    ]
    cancelled = asyncio.ensure_future(listeners[0].get())
    waiting = asyncio.ensure_future(listeners[1].get())
    await asyncio.sleep(0)  # both wait on the bell's one future
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert not waiting.done()
    listeners[1].put_many([_frame(1)])
    batch = await asyncio.wait_for(waiting, WAIT)
    assert [f.message_id for f in batch.frames] == ["1"]


async def test_a_full_queue_worth_of_messages_is_handed_over_without_waiting(
    pubsub_emulator: Any, topic: Topic
) -> None:
    async with _windowed_hub(stream_queue_size=3) as hub:
        async with hub.subscribe(topic.name) as listener:
            hub.fanout(topic.name, [_frame(1)])  # after a quiet spell: handed over at once
            first = await asyncio.wait_for(listener.get(), WAIT)
            hub.fanout(topic.name, [_frame(2)])
            hub.fanout(topic.name, [_frame(3)])
            assert len(listener) == 0  # waiting for the window's end
            hub.fanout(topic.name, [_frame(4)])  # a full queue's worth: no more waiting
            assert hub._feeds[topic.name].flush is None
            rest = await asyncio.wait_for(listener.get(), WAIT)
    assert [f.message_id for f in first.frames] == ["1"]
    assert [f.message_id for f in rest.frames] == ["2", "3", "4"]
    assert rest.dropped == 0


class _Received:
    """Stands for a Pub/Sub message of the streaming pull: records its ack."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        self.queued_at_ack: list[int] | None = None

    def ack(self) -> None:
        self.queued_at_ack = [len(listener) for listener in self.listeners]


async def test_a_message_is_acked_once_it_is_in_every_subscribers_queue(
    pubsub_emulator: Any, topic: Topic
) -> None:
    async with _windowed_hub() as hub:
        async with hub.subscribe(topic.name) as first, hub.subscribe(topic.name) as second:
            hub.fanout(topic.name, [_frame(1)])  # after a quiet spell: handed over at once
            waiting = _Received([first, second])
            hub.fanout(topic.name, [_frame(2)], [waiting])
            assert waiting.queued_at_ack is None  # held for the window: not acked yet
            _end_window(hub, topic.name)
            assert waiting.queued_at_ack == [2, 2]  # both frames in both queues by then
        nobody = _Received([])
        hub.fanout(topic.name, [_frame(3)], [nobody])  # no subscriber here: acked at once
        assert nobody.queued_at_ack == []


@contextlib.asynccontextmanager
async def _pulled_pair(topic: str) -> AsyncIterator[tuple[Hub, Any, Listener, Listener]]:
    """A hub with a long window and two subscribers of ``topic``, its streaming pull running."""
    async with _windowed_hub() as hub:
        async with hub.subscribe(topic) as first, hub.subscribe(topic) as second:
            feed = hub._feeds[topic]
            assert feed.pull is not None
            await asyncio.wait_for(feed.pull.running.wait(), WAIT)
            yield hub, feed, first, second


def _wait_for_hand_over_while_busy(hub: Hub, topic: str) -> None:
    """Block the loop, as a round of writes does, until the stream thread has handed a message
    over (its wake-up cannot run meanwhile)."""
    pull = hub._feeds[topic].pull
    assert pull is not None
    deadline = time.monotonic() + WAIT
    while not pull.arrived:
        assert time.monotonic() < deadline, "no message reached the stream thread"
        time.sleep(0.01)


async def test_a_message_arriving_during_a_round_of_writes_joins_that_round(
    pubsub_emulator: Any, admin: PubSubAdmin, topic: Topic
) -> None:
    async with _pulled_pair(topic.name) as (hub, feed, first, second):
        hub.fanout(topic.name, [_frame(1)])  # a round starts: both are woken
        done = await asyncio.wait_for(first.get(), WAIT)  # the first has written its frame
        [published] = _publish(admin, topic.name, 1)
        _wait_for_hand_over_while_busy(hub, topic.name)
        # The second, further along the round, sends the newcomer in the same frame (its
        # queue is not empty: get() returns without giving the loop a turn)...
        joined = await second.get()
        # ...and the first has it queued for when the round ends.
        assert len(first) == 1
        assert feed.unrung
        _end_window(hub, topic.name)  # the round's end
        late = await asyncio.wait_for(first.get(), WAIT)
    assert [f.message_id for f in done.frames] == ["1"]
    assert [f.message_id for f in joined.frames] == ["1", published]
    assert joined.chunk is not None  # one text for every connection in that position
    assert [f.message_id for f in late.frames] == [published]


async def test_a_round_takes_what_the_stream_thread_handed_over_before_its_wake_up_ran(
    pubsub_emulator: Any, admin: PubSubAdmin, topic: Topic
) -> None:
    # A busy loop runs a due flush before the wake-up the stream thread scheduled.
    async with _pulled_pair(topic.name) as (hub, feed, first, second):
        [published] = _publish(admin, topic.name, 1)
        _wait_for_hand_over_while_busy(hub, topic.name)
        hub._flush(feed)
        assert not feed.pull.arrived
        async with asyncio.timeout(WAIT):  # the wake-up would leave it for the next window
            batches = [await x.get() for x in (first, second)]
    assert [[f.message_id for f in b.frames] for b in batches] == [[published], [published]]
