"""StreamingPull's supervisor: when ``prepare`` runs, and that ``stop`` never cuts one short.

The Pub/Sub side of the streaming pull is covered with the emulator in test_fanout.py; these
tests replace the stream itself (``_subscribe``) to control the order of events exactly, which
the emulator cannot do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

from conftest import WAIT

from service.clients.pubsub.streaming_pull import StreamingPull


def _pull(prepare: Any, *, prepared: bool) -> StreamingPull:
    flow: Any = None
    pull = StreamingPull(
        None, "projects/p/subscriptions/s", lambda m: None, flow, prepare, prepared=prepared
    )
    pull._subscribe = lambda: concurrent.futures.Future()  # type: ignore[method-assign]
    return pull


async def test_first_start_skips_prepare_when_the_caller_prepared() -> None:
    calls: list[int] = []

    async def prepare() -> None:
        calls.append(1)

    for prepared, expected in ((True, 0), (False, 1)):
        calls.clear()
        pull = _pull(prepare, prepared=prepared)
        pull.start()
        await asyncio.wait_for(pull.running.wait(), WAIT)
        assert len(calls) == expected
        await asyncio.wait_for(pull.stop(), WAIT)


async def test_stop_lets_a_prepare_in_flight_finish() -> None:
    # A cancelled create may still reach Pub/Sub after the delete that follows stop(), and bring
    # the subscription back: stop() must return only once prepare has run to its end.
    entered, release = asyncio.Event(), asyncio.Event()
    outcome: list[str] = []

    async def prepare() -> None:
        entered.set()
        try:
            await release.wait()
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("finished")

    pull = _pull(prepare, prepared=False)
    pull.start()
    await asyncio.wait_for(entered.wait(), WAIT)
    stopping = asyncio.ensure_future(pull.stop())
    done, _ = await asyncio.wait([stopping], timeout=0.2)
    assert not done, "stop() returned while prepare was still running"
    release.set()
    await asyncio.wait_for(stopping, WAIT)
    assert outcome == ["finished"]
    assert not pull.running.is_set()
