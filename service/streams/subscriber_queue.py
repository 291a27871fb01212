"""One subscriber's bounded queue (:class:`Listener`), and the :class:`Bell` that wakes the idle
subscribers of a topic at once.

The topic's feed (:mod:`service.streams.feed`) fills every subscriber's queue with the same
:class:`~service.streams.frames.Frame` objects; the connection's writer takes them out in batches
(:meth:`Listener.get`) and writes each batch (on a websocket, as the frames of
:func:`~service.streams.frames.websocket_texts`). A full queue drops its oldest messages, or ends
the stream with 1013, per the slow-consumer policy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import CLOSE_TRY_AGAIN_LATER, StreamClosed
from .cursor import Resumption
from .frames import Batch, Chunk, Frame

NOT_RESUMED = Resumption()


class Bell:
    """Wakes every idle subscriber of a topic with one future: a woken task re-checks its queue.

    Waking thousands of connections one future each costs more than the frames they then write.
    ``refill``, when set, is called by each subscriber as it wakes, before it reads its queue: the
    feed uses it to hand over messages that arrived while the loop was busy writing.
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


class Listener:
    """A subscriber's bounded queue. Filled by the topic's feed, drained by the connection's
    writer."""

    __slots__ = (
        "_backlog",
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
        "resumption",
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
        # Replayed messages, sent before the queue's; made by the first replay (most
        # connections never have one: an empty list per connection would cost 56 bytes).
        self._backlog: list[Frame] | None = None
        self.resumption = NOT_RESUMED  # what its ``subscribed`` frame says
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

    @property
    def backlog(self) -> int:
        """How many replayed messages wait to be sent before the queue's."""
        return len(self._backlog) if self._backlog is not None else 0

    def replay(self, frames: list[Frame]) -> None:
        """Send ``frames``, messages the subscriber missed, before anything the queue holds or
        receives later. What is beyond ``capacity`` waits for the caller to call
        :meth:`trim_backlog` (a catch-up adds as fast as the subscriber reads)."""
        if self.closed is None and frames:
            if self._backlog is None:
                self._backlog = []
            self._backlog.extend(frames)
            self._wake()

    def attach(self, bell: Bell) -> None:
        """From now on be woken by the topic's ``bell`` (a resuming subscriber joins the live
        stream); a writer waiting on its own wake-up re-checks and waits on the bell."""
        self._bell = bell
        waiter = self._waiter
        if waiter is not None and not waiter.done():  # its own: it had no bell until now
            waiter.set_result(None)

    def trim_backlog(self) -> int:
        """Apply the slow-consumer policy to a backlog beyond ``capacity``; returns how many
        messages it dropped."""
        backlog = self._backlog
        excess = (len(backlog) if backlog is not None else 0) - self.capacity
        if backlog is None or excess <= 0 or self.closed is not None:
            return 0
        if self.close_when_full:
            backlog.clear()
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: queue full")
            return excess
        del backlog[:excess]
        self.dropped += excess
        self._wake()
        return excess

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
        while True:
            bell = self._bell  # set by attach() when a resuming subscriber joins
            if bell is not None and bell.refill is not None:
                bell.refill()
            if self.closed is not None:
                raise self.closed
            backlog = self._backlog
            if backlog:
                dropped, self.dropped = self.dropped, 0
                self.last_write = self._loop.time()
                frames = backlog[: self.max_frame]
                del backlog[: self.max_frame]
                if not backlog:
                    self._backlog = None
                return Batch(frames, dropped, False)
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
