"""Per-worker fan-out: one Pub/Sub subscription per topic, shared by every local subscriber.

::

    hub = await FANOUT.get()
    async with hub.subscribe("orders") as listener:
        while True:
            batch = await listener.get()      # raises StreamClosed when the server ends it

The first local subscriber of a topic creates the worker's subscription to it and starts one
streaming pull; the last one to leave schedules its deletion ``fanout_grace`` seconds later (a
subscriber arriving meanwhile keeps it). Every worker holds its own subscription, so every
subscriber everywhere receives every message; how the subscriptions are named, created, deleted and
swept is in :mod:`service.streams.subscriptions`.

Each received batch is serialized once (:func:`~service.streams.frames.encode_message`), put in
every local subscriber's bounded queue (:class:`~service.streams.subscriber_queue.Listener`), at
most once per ``subscribers / stream_frame_rate`` seconds so that messages arriving close together
share one websocket frame, and acked once it is there: each topic's :class:`~service.streams.feed.Feed`
does that. A full queue drops its oldest messages (the client is told how many) or closes the
connection with 1013, per ``stream_slow_policy``; it never delays the other subscribers. The
streaming pull resumes by itself after errors (see :mod:`service.clients.pubsub.streaming_pull`);
when the subscription is gone (an emulator restart, a deleted topic) it is created again, and
connected subscribers receive again once it is back. Once a second the hub also updates the
deliveries and queue-depth metrics, ends idle streams and asks for SSE heartbeats.

A subscriber that reconnects with the cursor of the last message it received
(:mod:`service.streams.cursor`) is first given what it missed: from the topic's recent history in
this worker (:mod:`service.streams.history`) when it reaches back that far, else from Pub/Sub's
retention of the topic (:mod:`service.streams.catchup`), then joins the live stream
(:meth:`Feed.join <service.streams.feed.Feed.join>`). Until it joins it is not among the feed's
listeners: its replay never delays the hand-over to the others.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from google.cloud import pubsub_v1
from google.pubsub_v1 import SubscriberAsyncClient

from .. import metrics
from ..clients.pubsub.specs import SUBSCRIBER
from ..clients.pubsub.streaming_pull import STREAMING, StreamingPull
from ..config import Settings, current_settings
from ..errors import CLOSE_GOING_AWAY, CLOSE_NORMAL, Unavailable
from ..loopclients import ClientSpec
from .catchup import CatchUp
from .cursor import Cursor, Resumption
from .feed import Feed
from .frames import Frame, encode_message
from .gate import GATE, ConnectionGate
from .subscriber_queue import Listener
from .subscriptions import FanoutSubscriptions

SAMPLE_INTERVAL = 1.0
READY_TIMEOUT = 15.0


class Hub:
    """The fan-out of one event loop (one Hypercorn worker)."""

    def __init__(
        self,
        settings: Settings,
        admin: SubscriberAsyncClient,
        streaming: pubsub_v1.SubscriberClient | None,
        gate: ConnectionGate,
    ) -> None:
        self.settings = settings
        self.subscriptions = FanoutSubscriptions(settings, admin)
        self.streaming = streaming
        self.gate = gate
        self._loop = asyncio.get_running_loop()
        self._feeds: dict[str, Feed] = {}  # by topic
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._sampler = self._spawn(self._sample())
        gate.on_close(self.begin_shutdown)

    @classmethod
    async def create(cls) -> Hub:
        settings = current_settings()
        hub = cls(settings, await SUBSCRIBER.get(), await STREAMING.get(), await GATE.get())
        hub._spawn(hub.subscriptions.sweep())
        return hub

    def feed(self, topic: str) -> Feed | None:
        """The feed of ``topic`` while it has subscribers here or is in its grace period."""
        return self._feeds.get(topic)

    @property
    def running_tasks(self) -> int:
        """How many background tasks of the hub (creating and deleting subscriptions, the sweep,
        the sampler) have not finished: none once :meth:`aclose` has returned."""
        return len(self._tasks)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(
        self, topic: str, *, heartbeat: float | None = None, cursor: Cursor | None = None
    ) -> _Listening:
        """``async with hub.subscribe(topic) as listener``: a listener receiving every message
        published to ``topic`` from now on.

        ``cursor``: where a reconnecting subscriber stopped; what it missed comes first (see
        :meth:`_resume`), and ``listener.resumption`` says whether all of it could be found.

        Raises (on entering):
            TopicNotFound: the topic does not exist.
            Unavailable: Pub/Sub cannot be reached, or the worker is shutting down.
        """
        return _Listening(self, topic, heartbeat, cursor)

    async def _enter(
        self, topic: str, heartbeat: float | None, cursor: Cursor | None = None
    ) -> tuple[Feed, Listener]:
        if self._closing:
            raise Unavailable("the server is shutting down")
        feed = self._feeds.get(topic)
        if feed is None:
            feed = self._feeds[topic] = self._open(topic)
        if feed.linger is not None:
            feed.linger.cancel()
            feed.linger = None
        settings = self.settings
        listener = Listener(
            topic,
            capacity=settings.stream_queue_size,
            close_when_full=settings.stream_slow_policy == "close",
            max_frame=settings.stream_max_frame_messages,
            heartbeat=heartbeat,
            # A resuming subscriber has its own wake-up until it joins: what it is replayed
            # must not wake every subscriber of the topic.
            bell=feed.bell if cursor is None else None,
        )
        if cursor is None:
            feed.listeners.add(listener)
        else:
            feed.resuming.add(listener)
        try:
            assert feed.created is not None
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await asyncio.shield(feed.created)
                    if cursor is not None:
                        await self._resume(feed, listener, cursor)
            except TimeoutError:
                raise Unavailable(f"subscribing to topic {topic!r} timed out") from None
        except BaseException:
            self._leave(feed, listener, counted=False)
            raise
        feed.subscribers_gauge.inc()
        return feed, listener

    async def _resume(self, feed: Feed, listener: Listener, cursor: Cursor) -> None:
        """Give ``listener`` what was published after ``cursor``, then the live stream: from the
        worker's recent history when it reaches back that far (no Pub/Sub call), else from the
        topic's retention in Pub/Sub (:class:`~service.streams.catchup.CatchUp`), else (no
        retention, or not enough) what the history has, and ``complete`` false."""
        replay = feed.history.after(cursor)
        if replay is not None:
            listener.resumption = Resumption(resumed=True, complete=True)
            feed.join(listener, replay)
            return
        if feed.retention is None:
            feed.retention = self._loop.create_task(self.subscriptions.topic_retention(feed))
        reading = feed.retention
        retention = await asyncio.shield(reading)
        if retention is None:  # not known (logged): asked again by the next resume
            if feed.retention is reading:
                feed.retention = None
            retention = 0.0
        since = cursor.published - feed.history.slack
        replay = feed.history.after(cursor)  # it may reach back far enough by now
        if replay is not None:
            listener.resumption = Resumption(resumed=True, complete=True)
            feed.join(listener, replay)
            return
        if retention <= 0:
            earliest = feed.history.complete_since
            listener.resumption = Resumption(resumed=True, complete=False, earliest=earliest)
            feed.join(listener, feed.history.since(since))
            return
        # The seek happens a moment after this: one second of margin.
        earliest = time.time() - retention + 1.0
        complete = since >= earliest
        listener.resumption = Resumption(
            resumed=True, complete=complete, earliest=None if complete else earliest
        )
        if feed.catchup is None:
            feed.catchup = CatchUp(feed, self.subscriptions)
            feed.catchup.task = self._spawn(feed.catchup.run())
        feed.catchup.add(listener, cursor)

    def _leave(self, feed: Feed, listener: Listener, *, counted: bool = True) -> None:
        feed.listeners.discard(listener)
        feed.resuming.discard(listener)
        if feed.catchup is not None:
            feed.catchup.discard(listener)
        if listener.delivered:
            feed.deliveries.inc(listener.delivered)
            listener.delivered = 0
        if counted:
            feed.subscribers_gauge.dec()
        topic = feed.topic
        if (
            not feed.listeners
            and not feed.resuming
            and not self._closing
            and self._feeds.get(topic) is feed
        ):
            if feed.created is not None and feed.created.done() and feed.created.exception():
                self._feeds.pop(topic)
            else:
                feed.linger = self._loop.call_later(
                    self.settings.fanout_grace, self._retire_later, feed
                )

    def _open(self, topic: str) -> Feed:
        feed = Feed(topic, self.subscriptions.path(topic), self.settings)
        feed.created = self._spawn(self._start_feed(feed))
        # Retrieved here so that a failure no subscriber awaits is not reported as unretrieved.
        feed.created.add_done_callback(lambda task: task.cancelled() or task.exception())
        return feed

    async def _start_feed(self, feed: Feed) -> None:
        await self.subscriptions.create(feed)
        assert self.streaming is not None
        flow = pubsub_v1.types.FlowControl(max_messages=self.settings.fanout_max_outstanding)
        feed.pull = StreamingPull(
            self.streaming,
            feed.subscription,
            lambda messages: self._dispatch(feed, messages),
            flow,
            prepare=lambda: self.subscriptions.create(feed, again=True),
            prepared=True,
            inline=True,
        )
        feed.pull.start()

    def _dispatch(self, feed: Feed, messages: list[Any]) -> None:
        """Serialize once and hand to the subscribers (see :meth:`fanout`), which acks them."""
        tag = feed.tag
        frames = [encode_message(message, tag=tag) for message in messages]
        self.fanout(feed.topic, frames, messages)

    def fanout(self, topic: str, frames: list[Frame], messages: list[Any] | None = None) -> None:
        """Put ``frames`` in the queue of every local subscriber of ``topic``, coalesced with
        those arriving close to them (see :mod:`service.streams.feed`).

        ``messages``, the Pub/Sub messages the frames came from, are acked once the frames are in
        every subscriber's queue (at once when the topic has no subscriber here).
        """
        feed = self._feeds.get(topic)
        if feed is None or not feed.listeners:
            if feed is not None:
                feed.remember(frames)
            for message in messages or ():
                message.ack()
            return
        feed.fanout(frames, messages)

    # -- retiring feeds -------------------------------------------------------------------

    def _retire_later(self, feed: Feed) -> None:
        feed.linger = None
        if self._feeds.get(feed.topic) is feed and not feed.listeners and not feed.resuming:
            del self._feeds[feed.topic]
            feed.cancel_flush()
            self._spawn(self._retire(feed))

    async def _retire(self, feed: Feed) -> None:
        if feed.created is not None and not feed.created.done():
            feed.created.cancel()
        if feed.retention is not None and not feed.retention.done():
            feed.retention.cancel()
        if feed.pull is not None:
            await feed.pull.stop()
        if feed.created is None or feed.created.cancelled() or feed.created.exception():
            return
        await self.subscriptions.delete(feed)

    def begin_shutdown(self) -> None:
        """Close every subscriber with 1001, then delete the subscriptions (in the background)."""
        if self._closing:
            return
        self._closing = True
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            if feed.linger is not None:
                feed.linger.cancel()
            feed.cancel_flush()
            for listener in (*feed.listeners, *feed.resuming):
                listener.close(CLOSE_GOING_AWAY, "server shutting down")
            if feed.catchup is not None and feed.catchup.task is not None:
                feed.catchup.task.cancel()  # it deletes its subscription
            self._spawn(self._retire(feed))

    async def aclose(self) -> None:
        """Close subscribers, delete subscriptions and wait for every task of the hub."""
        self.begin_shutdown()
        self._sampler.cancel()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- housekeeping ---------------------------------------------------------------------

    async def _sample(self) -> None:
        """Every second: the deliveries counter, the queue-depth gauge, idle timeouts and SSE
        heartbeats (counting deliveries here saves a metric update per frame)."""
        depth = metrics.STREAM_QUEUE_DEPTH
        idle = self.settings.stream_idle_timeout
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            now = self._loop.time()
            total = 0
            for feed in list(self._feeds.values()):
                delivered = 0
                for listener in (*feed.listeners, *feed.resuming):
                    total += len(listener)
                    delivered += listener.delivered
                    listener.delivered = 0
                    if idle and now - max(listener.last_activity, listener.last_write) > idle:
                        listener.close(CLOSE_NORMAL, "idle timeout")
                    elif listener.heartbeat and now - listener.last_write >= listener.heartbeat:
                        listener.request_heartbeat()
                if delivered:
                    feed.deliveries.inc(delivered)
            depth.set(total)


class _Listening:
    """What :meth:`Hub.subscribe` returns. A class rather than ``@asynccontextmanager``: the
    generator of the latter would stay alive, with its frame, for as long as each connection."""

    __slots__ = ("_cursor", "_entered", "_heartbeat", "_hub", "_topic")

    def __init__(
        self, hub: Hub, topic: str, heartbeat: float | None, cursor: Cursor | None
    ) -> None:
        self._hub = hub
        self._topic = topic
        self._heartbeat = heartbeat
        self._cursor = cursor
        self._entered: tuple[Feed, Listener] | None = None

    async def __aenter__(self) -> Listener:
        self._entered = await self._hub._enter(self._topic, self._heartbeat, self._cursor)
        return self._entered[1]

    async def __aexit__(self, *exc_info: object) -> None:
        if self._entered is not None:
            feed, listener = self._entered
            self._entered = None
            self._hub._leave(feed, listener)


FANOUT: ClientSpec[Hub] = ClientSpec("fanout", create=Hub.create, close=Hub.aclose)
