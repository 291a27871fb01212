"""One subscriber's bounded queue and the bell shared by the subscribers of a topic."""

from __future__ import annotations

import asyncio

import pytest
from conftest import WAIT

from service.streams.frames import Frame
from service.streams.subscriber_queue import Bell, Listener


def _frame(number: int) -> Frame:
    return Frame(str(number), f'{{"type":"message","messageId":"{number}"}}', 0.0)


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


async def test_a_replay_goes_out_before_the_queue_and_its_excess_follows_the_policy() -> None:
    listener = Listener("t", capacity=3, close_when_full=False, max_frame=2)
    listener.put_many([_frame(9)])
    listener.replay([_frame(n) for n in range(5)])
    assert listener.trim_backlog() == 2  # beyond capacity: the oldest replayed are dropped
    batches = [await asyncio.wait_for(listener.get(), WAIT) for _ in range(3)]
    assert [[f.message_id for f in b.frames] for b in batches] == [["2", "3"], ["4"], ["9"]]
    assert batches[0].dropped == 2
    closing = Listener("t", capacity=1, close_when_full=True, max_frame=2)
    closing.replay([_frame(1), _frame(2)])
    closing.trim_backlog()
    assert closing.closed is not None and closing.closed.code == 1013


async def test_a_resuming_subscriber_waiting_alone_is_woken_when_it_joins_the_bell() -> None:
    bell = Bell()
    listener = Listener("t", capacity=10, close_when_full=False, max_frame=10)
    waiting = asyncio.ensure_future(listener.get())
    await asyncio.sleep(0)  # it waits on its own wake-up
    listener.attach(bell)
    await asyncio.sleep(0)
    assert not waiting.done()  # woken, found nothing: now it waits on the bell
    listener.put_many([_frame(1)])
    batch = await asyncio.wait_for(waiting, WAIT)
    assert [f.message_id for f in batch.frames] == ["1"]
