"""One topic of a worker's fan-out: its local subscribers, and how messages are handed to them.

Handing messages to the subscribers costs one websocket frame per subscriber, whatever the number
of messages: so a feed does it at most once per ``subscribers / stream_frame_rate`` seconds (at
most ``stream_max_coalesce_delay``, and not once ``stream_queue_size`` or half of
``fanout_max_outstanding`` messages wait). A message arriving after a quiet spell goes out at
once; messages arriving faster share frames (:meth:`Feed.fanout`). A message that reaches the
worker during a round of writes joins that round for the connections it has not reached yet
(:meth:`Feed.refill`). The Pub/Sub messages are acked once their frames are in every subscriber's
queue, and in the topic's recent :class:`~service.streams.history.History`, which a subscriber
reconnecting here is replayed from (:meth:`Feed.join`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .. import metrics, tracing
from ..clients.pubsub.streaming_pull import StreamingPull
from ..config import Settings
from .cursor import topic_tag
from .frames import Chunk, Frame, encode_message
from .history import History
from .subscriber_queue import Bell, Listener

if TYPE_CHECKING:
    from .catchup import CatchUp


class Feed:
    """The local subscribers of one topic and what they are handed.

    The hub (:class:`~service.streams.hub.Hub`) makes a feed for the first local subscriber of a
    topic, adds and removes the subscribers' ``listeners``, sets ``created`` and ``pull``, and
    retires the feed after the last one has left.

    Args:
        topic: the topic's name.
        subscription: the path of the worker's subscription to it.
        settings: the coalescing settings (``stream_*``, ``fanout_max_outstanding``).
    """

    def __init__(self, topic: str, subscription: str, settings: Settings) -> None:
        self.topic = topic
        self.subscription = subscription
        self.listeners: set[Listener] = set()  # the queues of the local subscribers
        self.resuming: set[Listener] = set()  # subscribers not yet joined (see :meth:`join`)
        self.tag = topic_tag(topic)  # of the topic's resume cursors
        self.history = History(settings)
        self.catchup: CatchUp | None = None  # the topic's catch-up from Pub/Sub while one runs
        self.retention: asyncio.Task[float | None] | None = None  # the topic's, in seconds
        self.created: asyncio.Task[None] | None = None  # creates the subscription, starts the pull
        self.pull: StreamingPull | None = None
        self.linger: asyncio.TimerHandle | None = None  # the retirement after the last one left
        self.bell = Bell()
        self.bell.refill = self.refill
        self.subscribers_gauge = metrics.STREAM_SUBSCRIBERS.labels(topic=topic)
        self.deliveries = metrics.STREAM_DELIVERIES.labels(topic=topic)
        self._drops = metrics.STREAM_DROPS.labels(topic=topic, reason="dropped")
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._pending: list[Frame] = []
        self._unacked: list[Any] = []  # Pub/Sub messages behind ``_pending``
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushed = float("-inf")
        self._chunk: Chunk | None = None  # the last hand-over's, in every queue that was empty
        self._unrung = False  # queues were filled while the bell's round was under way
        self._tracing = tracing.current()  # None unless the app traces (service/tracing.py)

    @property
    def flush_scheduled(self) -> bool:
        """Whether frames wait for the end of the coalescing window (:meth:`flush` is due)."""
        return self._flush_timer is not None

    def fanout(self, frames: list[Frame], messages: list[Any] | None = None) -> None:
        """Put ``frames`` in every subscriber's queue, now or at the end of the window.

        ``messages``, the Pub/Sub messages the frames came from, are acked once the frames are in
        every subscriber's queue. The hub calls this while the topic has subscribers.
        """
        self._pending.extend(frames)
        if messages:
            self._unacked.extend(messages)
        settings = self._settings
        if self._flush_timer is not None:
            if len(self._pending) < min(
                settings.stream_queue_size, settings.fanout_max_outstanding // 2
            ):
                return
            # No queue holds more than this, and the pull's flow control stops at its
            # outstanding bound while these wait unacked: waiting longer would only stall.
            self._flush_timer.cancel()
            self.flush()
            return
        delay = self._next_flush() - self._loop.time()
        if delay <= 0:
            self.flush()
        else:
            self._flush_timer = self._loop.call_later(delay, self.flush)

    def join(self, listener: Listener, replay: list[Frame]) -> None:
        """Make ``listener`` a subscriber receiving what is handed over from now on, after
        ``replay``. Synchronous: nothing handed over in between is missed."""
        self.resuming.discard(listener)
        listener.replay(replay)
        listener.attach(self.bell)
        self.listeners.add(listener)

    def remember(self, frames: list[Frame]) -> None:
        """Keep ``frames`` in the history although no subscriber is connected (the hub acks
        them at once): a subscriber reconnecting within the grace period is replayed them."""
        self._collect()
        if self._pending:
            frames, self._pending = self._pending + frames, []
            unacked, self._unacked = self._unacked, []
            for message in unacked:
                message.ack()
        self.history.extend(frames)

    def flush(self) -> None:
        """Hand over what waits and wake the subscribers: the end of the coalescing window."""
        self._flush_timer = None
        self._flushed = self._loop.time()
        self._collect()
        if self._pending:
            self._hand_over()
        elif not self._unrung:
            return
        self._unrung = False
        self.bell.ring()

    def cancel_flush(self) -> None:
        """Cancel the hand-over scheduled for the end of the window (the feed is retired); a
        :meth:`refill` schedules none after it."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()

    def refill(self) -> None:
        """Called by each subscriber as it wakes to write: messages that arrived while the loop
        was writing this round go into every queue now. Subscribers further along the round send
        them in the frame they are about to write; the others get them when the round they started
        ends (the bell rings then), not a round later."""
        if self.pull is None or not self.pull.arrived or not self.listeners:
            return
        self._collect()
        self._hand_over(extend=True)
        self._unrung = True
        if self._flush_timer is None:
            delay = max(0.0, self._next_flush() - self._loop.time())
            self._flush_timer = self._loop.call_later(delay, self.flush)

    def _collect(self) -> None:
        """Take what the stream thread handed over whose wake-up has not run yet: a loop busy
        writing runs timers and running tasks first, and these would wait for the next round."""
        if self.pull is not None and self.pull.arrived:
            arrived = self.pull.collect()
            tag = self.tag
            self._pending.extend(encode_message(message, tag=tag) for message in arrived)
            self._unacked.extend(arrived)

    def _hand_over(self, *, extend: bool = False) -> None:
        """Put the pending frames in every subscriber's queue, then ack their messages."""
        frames, self._pending = self._pending, []
        unacked, self._unacked = self._unacked, []
        chunk = Chunk(frames)
        extending = None
        if extend and self._chunk is not None:
            extending = (self._chunk, Chunk(self._chunk.frames + frames))
        self.history.extend(frames)
        traced = self._tracing
        spans = None
        if traced is not None and unacked:
            spans = traced.start_deliveries(
                self.topic, self.subscription, unacked, len(self.listeners)
            )
        dropped = 0
        for listener in tuple(self.listeners):
            dropped += listener.put_many(frames, chunk, wake=False, extending=extending)
        if spans:
            tracing.end_deliveries(spans, dropped)
        self._chunk = chunk
        for message in unacked:
            message.ack()
        if dropped:
            self._drops.inc(dropped)

    def _next_flush(self) -> float:
        """When the next hand-over may be, on the loop's clock: ``subscribers /
        stream_frame_rate`` seconds after the last, at most ``stream_max_coalesce_delay``."""
        settings = self._settings
        interval = min(
            settings.stream_max_coalesce_delay, len(self.listeners) / settings.stream_frame_rate
        )
        return self._flushed + interval
