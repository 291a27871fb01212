"""The frames a subscriber is sent: each message serialized once, shared by every connection.

Each message is serialized once, when it arrives from Pub/Sub, into the text of a single-message
frame (:func:`encode_message`); every subscriber's queue holds a reference to that same
:class:`Frame`. When several messages wait for one connection they go out together in one
``{"type": "messages", "messages": [...]}`` frame whose items are those same texts (each with its
resume cursor as ``"id"``), so nothing is
serialized per subscriber; when the hub hands several messages to every subscriber at once (a
:class:`Chunk`), the text of that frame is built once and shared by every connection that had
nothing else waiting.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from .cursor import encode_cursor

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class Frame:
    """A message serialized once: the JSON text of a ``{"type": "message", ...}`` frame."""

    message_id: str
    text: str
    published: float  # Pub/Sub's publish time, seconds since the epoch
    cursor: str = ""  # its resume cursor (:mod:`service.streams.cursor`), the ``id`` in ``text``

    @property
    def event_id(self) -> str:
        """The SSE ``id:`` of this message: its cursor (its message id when it has none)."""
        return self.cursor or self.message_id


class Chunk:
    """Messages handed to every subscriber of a topic at once; their coalesced text is built once."""

    __slots__ = ("_text", "frames")

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self._text: str | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = coalesced_text(self.frames)
        return self._text


class Batch(NamedTuple):
    """What one subscriber is sent next (see :func:`websocket_texts`)."""

    frames: list[Frame]
    dropped: int  # messages the slow-consumer policy dropped since the last batch
    heartbeat: bool  # nothing to send, but it is time for a heartbeat (SSE)
    chunk: Chunk | None = None  # set when ``frames`` are exactly this chunk's


def encode_message(message: Any, *, ack_id: str | None = None, tag: str | None = None) -> Frame:
    """Serialize a received Pub/Sub message (``google.cloud.pubsub_v1`` ``Message``, or the
    ``PubsubMessage`` of a unary pull).

    ``tag``: the topic's cursor tag (:func:`~service.streams.cursor.topic_tag`); the frame then
    carries its resume cursor as ``"id"``.
    """
    published = message.publish_time
    cursor = ""
    body: dict[str, Any] = {"type": "message"}
    if tag is not None:
        cursor = body["id"] = encode_cursor(tag, microseconds(published), message.message_id)
    body |= {
        "messageId": message.message_id,
        "data": base64.b64encode(message.data).decode("ascii"),
        "attributes": dict(message.attributes),
        "orderingKey": message.ordering_key,
        "publishTime": published.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if ack_id is not None:
        body["ackId"] = ack_id
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Frame(message.message_id, text, published.timestamp(), cursor)


def microseconds(moment: datetime) -> int:
    """``moment`` (timezone-aware) in whole microseconds since the epoch, without float rounding."""
    return (moment - EPOCH) // MICROSECOND


def dropped_text(count: int) -> str:
    """The text of the notice that ``count`` messages were dropped."""
    return f'{{"type":"dropped","count":{count}}}'


def coalesced_text(frames: list[Frame]) -> str:
    """One websocket frame's text for ``frames``: a ``message``, or ``messages`` when several."""
    if len(frames) == 1:
        return frames[0].text
    return '{"type":"messages","messages":[' + ",".join(f.text for f in frames) + "]}"


def websocket_texts(batch: Batch) -> list[str]:
    """The websocket text frames for ``batch``: a drop notice, then one (coalesced) frame."""
    texts = [dropped_text(batch.dropped)] if batch.dropped else []
    if batch.chunk is not None:
        texts.append(batch.chunk.text)
    elif batch.frames:
        texts.append(coalesced_text(batch.frames))
    return texts
