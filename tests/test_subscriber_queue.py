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
