"""StreamingPull's supervisor: when ``prepare`` runs, and that ``stop`` never cuts one short;
and the streaming client's channel to the emulator.

The Pub/Sub side of the streaming pull is covered with the emulator in test_fanout.py; the
supervisor's tests replace the stream itself (``_subscribe``) to control the order of events
exactly, which the emulator cannot do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import pytest
from conftest import WAIT, Topic
from google.cloud import pubsub_v1

from service.clients.pubsub.streaming_pull import (
    StreamingPull,
    close_streaming_client,
    create_streaming_client,
)


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


@pytest.mark.emulator
async def test_a_streaming_pull_response_beyond_4_mib_reaches_the_callback(topic: Topic) -> None:
    # Published before the stream opens, the backlog comes in one response of about 6 MiB: on a
    # channel with gRPC's default 4 MiB limit the stream fails, is opened again, and the
    # messages of that response never come.
    data = b"x" * (1024 * 1024)
    path = topic.admin.publisher.topic_path(topic.admin.project, topic.name)
    sent = {topic.admin.publisher.publish(path, data).result(WAIT) for _ in range(6)}
    received: set[str] = set()
    done = asyncio.Event()

    def on_messages(messages: list[Any]) -> None:
        for message in messages:
            received.add(message.message_id)
            message.ack()
        if received >= sent:
            done.set()

    client = await create_streaming_client()
    flow = pubsub_v1.types.FlowControl(max_messages=1000)
    pull = StreamingPull(client, topic.subscription, on_messages, flow)
    pull.start()
    try:
        await asyncio.wait_for(done.wait(), WAIT)
    finally:
        await pull.stop()
        await close_streaming_client(client)
    assert received == sent
