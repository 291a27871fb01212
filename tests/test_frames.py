"""The frames a subscriber is sent: one serialization per message, shared texts."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from service.streams.cursor import Cursor, decode_cursor, topic_tag
from service.streams.frames import (
    Batch,
    Chunk,
    Frame,
    coalesced_text,
    dropped_text,
    encode_message,
    websocket_texts,
)


@dataclass
class _Message:
    """The fields of a received ``google.cloud.pubsub_v1`` message that are sent."""

    message_id: str = "42"
    data: bytes = b"\x00hello"
    attributes: dict[str, str] = field(default_factory=lambda: {"k": "vé"})
    ordering_key: str = ""
    publish_time: datetime = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def _frame(number: int) -> Frame:
    return encode_message(_Message(message_id=str(number)))


def test_a_message_is_serialized_into_its_frame() -> None:
    frame = encode_message(_Message())
    assert frame.message_id == "42"
    assert frame.published == datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC).timestamp()
    assert json.loads(frame.text) == {
        "type": "message",
        "messageId": "42",
        "data": base64.b64encode(b"\x00hello").decode(),
        "attributes": {"k": "vé"},
        "orderingKey": "",
        "publishTime": "2025-01-02T03:04:05.123456Z",
    }
    assert "vé" in frame.text  # not escaped: the frame is sent as UTF-8 text


def test_a_topic_stream_message_carries_its_resume_cursor_as_id() -> None:
    frame = encode_message(_Message(), tag=topic_tag("orders"))
    body = json.loads(frame.text)
    assert list(body)[:3] == ["type", "id", "messageId"]
    assert body["id"] == frame.cursor == frame.event_id
    published_us = int(datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC).timestamp()) * 10**6
    assert decode_cursor(frame.cursor, "orders") == Cursor(published_us + 123456, "42")
    assert encode_message(_Message()).event_id == "42"  # no cursor: the message id


def test_a_queue_mode_message_carries_its_ack_id() -> None:
    body: dict[str, Any] = json.loads(encode_message(_Message(), ack_id="ack-1").text)
    assert body["ackId"] == "ack-1"


def test_one_message_goes_out_as_itself_several_in_one_messages_frame() -> None:
    one, two = _frame(1), _frame(2)
    assert coalesced_text([one]) is one.text
    assert json.loads(coalesced_text([one, two])) == {
        "type": "messages",
        "messages": [json.loads(one.text), json.loads(two.text)],
    }


def test_a_chunk_builds_its_text_once() -> None:
    chunk = Chunk([_frame(1), _frame(2)])
    assert chunk.text is chunk.text
    assert chunk.text == coalesced_text(chunk.frames)


def test_websocket_texts_are_the_drop_notice_then_one_frame() -> None:
    frames = [_frame(1), _frame(2)]
    assert websocket_texts(Batch(frames, 3, False)) == [dropped_text(3), coalesced_text(frames)]
    assert json.loads(dropped_text(3)) == {"type": "dropped", "count": 3}
    assert websocket_texts(Batch([], 0, True)) == []  # a heartbeat is no websocket frame


def test_every_connection_sent_a_whole_chunk_shares_its_text() -> None:
    chunk = Chunk([_frame(1), _frame(2)])
    texts = [websocket_texts(Batch(chunk.frames, 0, False, chunk)) for _ in range(2)]
    assert texts[0][0] is texts[1][0] is chunk.text
