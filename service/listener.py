"""One subscriber's bounded queue of messages, and the frames it is sent.

Each message is serialized once, when it arrives from Pub/Sub, into the text of a single-message
frame; every subscriber's queue holds a reference to that same :class:`Frame`. When several messages
wait for one connection they go out together in one ``{"type": "messages", "messages": [...]}``
frame whose items are those same texts, so nothing is serialized per subscriber.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections import deque
from dataclasses import dataclass
from typing import Any, NamedTuple

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TRY_AGAIN_LATER = 1013


class StreamClosed(Exception):
    """The server ends this subscriber's stream; ``code`` is the websocket close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Frame:
    """A message serialized once: the JSON text of a ``{"type": "message", ...}`` frame."""

    message_id: str
    text: str
    published: float  # Pub/Sub's publish time, seconds since the epoch


class Batch(NamedTuple):
    frames: list[Frame]
    dropped: int
    heartbeat: bool


def encode_message(message: Any, *, ack_id: str | None = None) -> Frame:
    """Serialize a received Pub/Sub message (``google.cloud.pubsub_v1`` ``Message``)."""
    published = message.publish_time
    body: dict[str, Any] = {
        "type": "message",
        "messageId": message.message_id,
        "data": base64.b64encode(message.data).decode("ascii"),
        "attributes": dict(message.attributes),
        "orderingKey": message.ordering_key,
        "publishTime": published.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if ack_id is not None:
        body["ackId"] = ack_id
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    return Frame(message.message_id, text, published.timestamp())


def dropped_text(count: int) -> str:
    return f'{{"type":"dropped","count":{count}}}'


def websocket_texts(batch: Batch) -> list[str]:
    """The websocket text frames for ``batch``: a drop notice, then one (coalesced) frame."""
    texts = [dropped_text(batch.dropped)] if batch.dropped else []
    frames = batch.frames
    if len(frames) == 1:
        texts.append(frames[0].text)
    elif frames:
        texts.append('{"type":"messages","messages":[' + ",".join(f.text for f in frames) + "]}")
    return texts


class Listener:
    """A subscriber's bounded queue. Filled by the hub, drained by the connection's writer."""

    def __init__(
        self,
        topic: str,
        *,
        capacity: int,
        close_when_full: bool,
        max_frame: int,
        heartbeat: float | None = None,
    ) -> None:
        self.topic = topic
        self.capacity = capacity
        self.close_when_full = close_when_full
        self.max_frame = max_frame
        self.heartbeat = heartbeat
        self._loop = asyncio.get_running_loop()
        self._queue: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._heartbeat_due = False
        self.dropped = 0
        self.closed: StreamClosed | None = None
        self.last_activity = self._loop.time()
        self.last_write = self.last_activity

    def __len__(self) -> int:
        return len(self._queue)

    def put_many(self, frames: list[Frame]) -> int:
        """Queue ``frames``; returns how many messages the slow-consumer policy dropped."""
        if self.closed is not None:
            return 0
        queue = self._queue
        queue.extend(frames)
        excess = len(queue) - self.capacity
        if excess > 0:
            if self.close_when_full:
                queue.clear()
                self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: queue full")
                return excess
            for _ in range(excess):
                queue.popleft()
            self.dropped += excess
        self.last_activity = self._loop.time()
        self._wake()
        return max(excess, 0)

    def touch(self) -> None:
        """The client sent something: it is not idle."""
        self.last_activity = self._loop.time()

    def request_heartbeat(self) -> None:
        self._heartbeat_due = True
        self._wake()

    def close(self, code: int, reason: str) -> None:
        """End the stream: the writer's next :meth:`get` raises :class:`StreamClosed`."""
        if self.closed is None:
            self.closed = StreamClosed(code, reason)
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Batch:
        """The next batch: every waiting message (up to ``max_frame``) and the drop count.

        Raises:
            StreamClosed: the server ended the stream.
        """
        while True:
            if self.closed is not None:
                raise self.closed
            queue = self._queue
            if queue or self.dropped:
                count = min(len(queue), self.max_frame)
                frames = [queue.popleft() for _ in range(count)]
                dropped, self.dropped = self.dropped, 0
                self.last_write = self._loop.time()
                return Batch(frames, dropped, False)
            if self._heartbeat_due:
                self._heartbeat_due = False
                self.last_write = self._loop.time()
                return Batch([], 0, True)
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
