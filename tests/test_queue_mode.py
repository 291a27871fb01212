"""Queue mode's reading of client frames and its error notices: through Quart's test client
against the Pub/Sub emulator, and the consumer on its own. (Delivery, nacks and redelivery through
a real server are in tests/test_stream.py; hostile clients through a real server in
tests/test_hostile_clients.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import WAIT, Topic, make_settings
from quart import Quart
from quart.testing.connections import WebsocketDisconnectError

from service import create_app
from service.streams.queue_mode import (
    MAX_ECHOED_IDS,
    MAX_FRAME_CHARS,
    MAX_PENDING_NOTICES,
    QueueConsumer,
    parse_settlement,
)


@pytest.fixture
async def queue_app(pubsub_emulator: Any) -> AsyncIterator[Quart]:
    app = create_app(make_settings(subscriptions="*"))
    async with app.test_app():
        yield app


def stream_path(topic: Topic) -> str:
    return f"/v1/subscriptions/{topic.subscription.rsplit('/', 1)[1]}/stream"


async def receive_json(ws: Any) -> Any:
    return json.loads(await asyncio.wait_for(ws.receive(), WAIT))


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 200_000,  # json.loads raises RecursionError for this, not ValueError
        '{"ack": [[[["x"]]]]}',
        b"\xff\xfe not utf-8",
        json.dumps({"ack": ["x" * MAX_FRAME_CHARS]}),  # Hypercorn's own limit is not here
        '{"ack": "x"}',
        '{"ack": [1]}',
        '{"other": []}',
        "{}",
        "[]",
        "not json",
    ],
)
async def test_a_frame_that_is_not_a_settlement_is_answered_and_reading_goes_on(
    queue_app: Quart, topic: Topic, frame: str | bytes
) -> None:
    async with queue_app.test_client().websocket(stream_path(topic)) as ws:
        assert (await receive_json(ws))["type"] == "subscribed"
        await ws.send(frame)
        answer = await receive_json(ws)
        assert answer["type"] == "error" and answer["message"].startswith("expected"), answer
        await ws.send(json.dumps({"ack": ["x"], "nack": ["y"]}))
        assert await receive_json(ws) == {
            "type": "error",
            "message": "ack: unknown ackIds",
            "ackIds": ["x"],
            "count": 1,
        }
        assert (await receive_json(ws))["ackIds"] == ["y"]


async def test_unknown_ids_are_echoed_within_bounds(queue_app: Quart, topic: Topic) -> None:
    ids = ["z" * 200_000, *(f"id-{i}" for i in range(50))]
    async with queue_app.test_client().websocket(stream_path(topic)) as ws:
        assert (await receive_json(ws))["type"] == "subscribed"
        await ws.send(json.dumps({"nack": ids}))
        answer = await receive_json(ws)
    # The long id is not echoed (Pub/Sub never issues one); the rest up to the bound are.
    assert answer["ackIds"] == ids[1 : 1 + MAX_ECHOED_IDS]
    assert answer["count"] == len(ids)


async def test_a_failure_while_reading_closes_with_1011_and_is_logged(
    queue_app: Quart,
    topic: Topic,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(self: QueueConsumer, ack_ids: list[str], *, ack: bool) -> list[str]:
        raise RuntimeError("settling failed")

    monkeypatch.setattr(QueueConsumer, "settle", broken)
    with caplog.at_level(logging.ERROR, logger="loopgate.queue"):
        async with queue_app.test_client().websocket(stream_path(topic)) as ws:
            assert (await receive_json(ws))["type"] == "subscribed"
            await ws.send(json.dumps({"ack": ["x"]}))
            with pytest.raises(WebsocketDisconnectError) as closed:
                await receive_json(ws)
    assert closed.value.args == (1011,)
    (record,) = [r for r in caplog.records if r.name == "loopgate.queue"]
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


def test_settlement_frames_are_parsed() -> None:
    assert parse_settlement('{"ack": ["a", "b"], "nack": ["c"]}') == {
        "ack": ["a", "b"],
        "nack": ["c"],
    }
    assert parse_settlement(b'{"nack": []}') == {"nack": []}
    assert parse_settlement('{"ack": ["a[b"], "nack": []}') is None  # past the bracket bound


async def test_notices_past_the_bound_are_counted_in_one_notice() -> None:
    consumer = QueueConsumer(None, None, "projects/p/subscriptions/s", make_settings())
    for _ in range(100):
        consumer.settle_frame("not json")
    texts = await asyncio.wait_for(consumer.get(), WAIT)
    assert len(texts) == MAX_PENDING_NOTICES + 1
    assert json.loads(texts[-1])["dropped"] == 100 - MAX_PENDING_NOTICES
    consumer.settle_frame('{"ack": ["x"]}')
    (text,) = await asyncio.wait_for(consumer.get(), WAIT)
    assert json.loads(text)["ackIds"] == ["x"]
