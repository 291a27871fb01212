"""One subscriber's bounded queue of messages, and the frames it is sent.

Each message is serialized once, when it arrives from Pub/Sub, into the text of a single-message
frame; every subscriber's queue holds a reference to that same :class:`Frame`. When several messages
wait for one connection they go out together in one ``{"type": "messages", "messages": [...]}``
frame whose items are those same texts, so nothing is serialized per subscriber; when the hub hands
several messages to every subscriber at once (a :class:`Chunk`), the text of that frame is built
once and shared by every connection that had nothing else waiting.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..errors import CLOSE_TRY_AGAIN_LATER, StreamClosed


@dataclass(frozen=True, slots=True)
class Frame:
    """A message serialized once: the JSON text of a ``{"type": "message", ...}`` frame."""

    message_id: str
    text: str
    published: float  # Pub/Sub's publish time, seconds since the epoch


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


class Bell:
    """Wakes every idle subscriber of a topic with one future: a woken task re-checks its queue.

    Waking thousands of connections one future each costs more than the frames they then write.
    ``refill``, when set, is called by each subscriber as it wakes, before it reads its queue: the
    hub uses it to hand over messages that arrived while the loop was busy writing.
    """

    __slots__ = ("_future", "_loop", "refill")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._future: asyncio.Future[None] | None = None
        self.refill: Callable[[], None] | None = None

    def future(self) -> asyncio.Future[None]:
        if self._future is None or self._future.done():
            self._future = self._loop.create_future()
        return self._future

    def ring(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)


class Batch(NamedTuple):
    frames: list[Frame]
    dropped: int
    heartbeat: bool
    chunk: Chunk | None = None  # set when ``frames`` are exactly this chunk's


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


class Listener:
    """A subscriber's bounded queue. Filled by the hub, drained by the connection's writer."""

    __slots__ = (
        "_bell",
        "_chunk",
        "_heartbeat_due",
        "_loop",
        "_queue",
        "_waiter",
        "capacity",
        "close_when_full",
        "closed",
        "delivered",
        "dropped",
        "heartbeat",
        "last_activity",
        "last_write",
        "max_frame",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        *,
        capacity: int,
        close_when_full: bool,
        max_frame: int,
        heartbeat: float | None = None,
        bell: Bell | None = None,
    ) -> None:
        self.topic = topic
        self._bell = bell
        self.capacity = capacity
        self.close_when_full = close_when_full
        self.max_frame = max_frame
        self.heartbeat = heartbeat
        self._loop = asyncio.get_running_loop()
        # A list, not a deque: an empty deque takes 760 bytes, an empty list 56, and most
        # connections are idle; the queue is bounded, so removing from its front stays cheap.
        self._queue: list[Frame] = []
        self._chunk: Chunk | None = None  # the queue holds exactly this chunk's frames
        self._waiter: asyncio.Future[None] | None = None
        self._heartbeat_due = False
        self.dropped = 0
        self.delivered = 0  # messages written, not yet added to the deliveries metric
        self.closed: StreamClosed | None = None
        self.last_activity = self._loop.time()  # the client's last frame
        self.last_write = self.last_activity

    def __len__(self) -> int:
        return len(self._queue)

    def put_many(
        self,
        frames: list[Frame],
        chunk: Chunk | None = None,
        *,
        wake: bool = True,
        extending: tuple[Chunk, Chunk] | None = None,
    ) -> int:
        """Queue ``frames`` (the frames of ``chunk``, if given, whose text is then shared);
        returns how many messages the slow-consumer policy dropped. With ``wake=False`` the
        caller rings the listeners' :class:`Bell` itself. ``extending``, ``(previous, joined)``:
        a queue still holding exactly ``previous`` shares ``joined``, previous' frames and these.
        """
        if self.closed is not None:
            return 0
        queue = self._queue
        if not queue:
            self._chunk = chunk
        elif extending is not None and self._chunk is extending[0]:
            self._chunk = extending[1]
        else:
            self._chunk = None
        queue.extend(frames)
        excess = len(queue) - self.capacity
        if excess > 0:
            self._chunk = None
            if self.close_when_full:
                queue.clear()
                self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: queue full")
                return excess
            del queue[:excess]
            self.dropped += excess
        if wake:
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
            if self._bell is not None:
                self._bell.ring()  # the waiter is shared: the others find nothing new and wait again
            else:
                waiter.set_result(None)

    async def get(self) -> Batch:
        """The next batch: every waiting message (up to ``max_frame``) and the drop count.

        Raises:
            StreamClosed: the server ended the stream.
        """
        bell = self._bell
        while True:
            if bell is not None and bell.refill is not None:
                bell.refill()
            if self.closed is not None:
                raise self.closed
            queue = self._queue
            if queue or self.dropped:
                chunk, self._chunk = self._chunk, None
                dropped, self.dropped = self.dropped, 0
                self.last_write = self._loop.time()
                if chunk is not None and len(queue) <= self.max_frame:
                    queue.clear()
                    return Batch(chunk.frames, dropped, False, chunk)
                count = min(len(queue), self.max_frame)
                frames = queue[:count]
                del queue[:count]
                return Batch(frames, dropped, False)
            if self._heartbeat_due:
                self._heartbeat_due = False
                self.last_write = self._loop.time()
                return Batch([], 0, True)
            self._waiter = bell.future() if bell is not None else self._loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                # A task cancelled while awaiting the bell's shared future cancels that future
                # too: for the other listeners that is only a ring.
                task = asyncio.current_task()
                if bell is None or task is None or task.cancelling():
                    raise
            finally:
                self._waiter = None
