"""One topic's feed: coalescing and hand-over to its subscribers' queues (no Pub/Sub: frames are
handed to the feed directly; tests/test_fanout.py has them come through a real streaming pull)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from conftest import WAIT, make_settings

from service.streams.feed import Feed
from service.streams.frames import Frame, websocket_texts
from service.streams.subscriber_queue import Listener


def _frame(number: int) -> Frame:
    text = json.dumps({"type": "message", "messageId": str(number)}, separators=(",", ":"))
    return Frame(str(number), text, 0.0)


def _feed(count: int, **overrides: Any) -> tuple[Feed, list[Listener]]:
    """A feed whose coalescing window is far longer than any test, with ``count`` subscribers."""
    # The window is subscribers / stream_frame_rate seconds, at most stream_max_coalesce_delay.
    settings = make_settings(stream_frame_rate=0.001, stream_max_coalesce_delay=60, **overrides)
    feed = Feed("t", "projects/p/subscriptions/s", settings)
    listeners = [
        Listener(
            "t",
            capacity=settings.stream_queue_size,
            close_when_full=False,
            max_frame=settings.stream_max_frame_messages,
            bell=feed.bell,
        )
        for _ in range(count)
    ]
    feed.listeners.update(listeners)
    return feed, listeners


def _end_window(feed: Feed) -> None:
    """Run the scheduled hand-over now instead of at its window's end."""
    assert feed.flush_scheduled
    feed.cancel_flush()
    feed.flush()


def _ids(frames: list[Frame]) -> list[str]:
    return [frame.message_id for frame in frames]


async def test_messages_arriving_together_share_one_frame_built_once() -> None:
    # What arrives after the first hand-over waits for the next.
    feed, (first, second) = _feed(2)
    feed.fanout([_frame(1)])  # after a quiet spell: handed over at once
    feed.fanout([_frame(2)])
    feed.fanout([_frame(3)])
    for listener in (first, second):
        batch = await asyncio.wait_for(listener.get(), WAIT)
        assert _ids(batch.frames) == ["1"]
        assert len(listener) == 0
    _end_window(feed)
    batches = [await asyncio.wait_for(x.get(), WAIT) for x in (first, second)]
    assert [_ids(b.frames) for b in batches] == [["2", "3"], ["2", "3"]]
    texts = [websocket_texts(b) for b in batches]
    assert texts[0][0] is texts[1][0]  # one text for both connections
    assert json.loads(texts[0][0]) == {
        "type": "messages",
        "messages": [{"type": "message", "messageId": "2"}, {"type": "message", "messageId": "3"}],
    }


async def test_a_waiting_subscriber_is_woken_at_the_end_of_the_window() -> None:
    feed, (listener,) = _feed(1)
    feed.fanout([_frame(1)])
    assert _ids((await asyncio.wait_for(listener.get(), WAIT)).frames) == ["1"]
    waiting = asyncio.ensure_future(listener.get())
    await asyncio.sleep(0)  # it waits on the bell
    feed.fanout([_frame(2)])
    _end_window(feed)
    assert _ids((await asyncio.wait_for(waiting, WAIT)).frames) == ["2"]


async def test_a_full_queue_worth_of_messages_is_handed_over_without_waiting() -> None:
    feed, (listener,) = _feed(1, stream_queue_size=3)
    feed.fanout([_frame(1)])  # after a quiet spell: handed over at once
    first = await asyncio.wait_for(listener.get(), WAIT)
    feed.fanout([_frame(2)])
    feed.fanout([_frame(3)])
    assert len(listener) == 0 and feed.flush_scheduled  # waiting for the window's end
    feed.fanout([_frame(4)])  # a full queue's worth: no more waiting
    assert len(listener) == 3 and not feed.flush_scheduled
    rest = await asyncio.wait_for(listener.get(), WAIT)
    assert _ids(first.frames) == ["1"]
    assert _ids(rest.frames) == ["2", "3", "4"]
    assert rest.dropped == 0


class _Received:
    """Stands for a Pub/Sub message of the streaming pull: records its ack."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        self.queued_at_ack: list[int] | None = None

    def ack(self) -> None:
        self.queued_at_ack = [len(listener) for listener in self.listeners]


async def test_a_message_is_acked_once_it_is_in_every_subscribers_queue() -> None:
    feed, listeners = _feed(2)
    at_once = _Received(listeners)
    feed.fanout([_frame(1)], [at_once])  # after a quiet spell: handed over at once
    assert at_once.queued_at_ack == [1, 1]
    waiting = _Received(listeners)
    feed.fanout([_frame(2)], [waiting])
    assert waiting.queued_at_ack is None  # held for the window: not acked yet
    _end_window(feed)
    assert waiting.queued_at_ack == [2, 2]  # both frames in both queues by then
