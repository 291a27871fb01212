"""Per-worker fan-out: one Pub/Sub subscription per topic, shared by every local subscriber.

::

    hub = await FANOUT.get()
    async with hub.subscribe("orders") as listener:
        while True:
            batch = await listener.get()      # raises StreamClosed when the server ends it

The first local subscriber of a topic creates the worker's subscription to it and starts one
streaming pull; the last one to leave schedules its deletion ``fanout_grace`` seconds later (a
subscriber arriving meanwhile keeps it). Because every worker of every instance holds its own
subscription, every subscriber everywhere receives every message. The subscription's name tells its
host and worker (``<prefix>-fanout.<host>.<pid>.<token>.<topic>``), it carries labels, Pub/Sub's
shortest expiration policy (1 day of inactivity) and shortest retention (10 minutes), so the
subscription of a worker that crashed disappears by itself. At startup a worker deletes the
leftovers of its own prefix and host: subscriptions of processes that are gone, and subscriptions
whose topic was deleted.

Each received batch is serialized once (:func:`~service.streams.subscriber_queue.encode_message`),
put in every local subscriber's bounded queue, at most once per ``subscribers / stream_frame_rate`` seconds so
that messages arriving close together share one websocket frame (see :meth:`Hub.fanout`), and
acked once it is there. A message that reaches the worker during a round of writes joins that
round for the connections it has not reached yet (:meth:`Hub._refill`). A full queue drops its
oldest messages (the client is told how many) or closes the connection with 1013, per
``stream_slow_policy``; it never delays the other subscribers. The streaming pull resumes by itself
after errors (see :mod:`service.clients.pubsub.streaming_pull`); when the subscription is gone (an emulator
restart, a deleted topic) it is created again, and connected subscribers receive again once it is
back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2
from google.pubsub_v1 import SubscriberAsyncClient
from google.pubsub_v1.types import ExpirationPolicy, Subscription

from .. import metrics
from ..clients.pubsub.errors import translate
from ..clients.pubsub.specs import SUBSCRIBER
from ..clients.pubsub.streaming_pull import STREAMING, StreamingPull
from ..config import Settings, current_settings
from ..errors import CLOSE_GOING_AWAY, CLOSE_NORMAL, Unavailable
from ..loopclients import ClientSpec
from .gate import GATE, ConnectionGate
from .subscriber_queue import Bell, Chunk, Frame, Listener, encode_message

log = logging.getLogger("loopgate.fanout")

EXPIRATION = duration_pb2.Duration(seconds=24 * 3600)  # Pub/Sub's minimum
RETENTION = duration_pb2.Duration(seconds=600)  # Pub/Sub's minimum
SAMPLE_INTERVAL = 1.0
READY_TIMEOUT = 15.0


def _label(value: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


@dataclass(eq=False)
class _Feed:
    topic: str
    subscription: str
    listeners: set[Listener] = field(default_factory=set)
    created: asyncio.Task[None] | None = None
    pull: StreamingPull | None = None
    linger: asyncio.TimerHandle | None = None
    pending: list[Frame] = field(default_factory=list)
    unacked: list[Any] = field(default_factory=list)  # Pub/Sub messages behind ``pending``
    flush: asyncio.TimerHandle | None = None
    flushed: float = float("-inf")
    bell: Bell = field(default_factory=Bell)
    chunk: Chunk | None = None  # what the last hand-over put in every queue that was empty
    unrung: bool = False  # queues were filled while the bell's round was under way
    subscribers_gauge: Any = None
    drops: Any = None
    deliveries: Any = None


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
        self.admin = admin
        self.streaming = streaming
        self.gate = gate
        self.host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
        self.pid = os.getpid()
        self.token = secrets.token_hex(3)
        self.prefix = f"{settings.fanout_prefix}-fanout."
        self._loop = asyncio.get_running_loop()
        self._feeds: dict[str, _Feed] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._sampler = self._spawn(self._sample())
        gate.on_close(self.begin_shutdown)

    @classmethod
    async def create(cls) -> Hub:
        settings = current_settings()
        hub = cls(settings, await SUBSCRIBER.get(), await STREAMING.get(), await GATE.get())
        hub._spawn(hub.sweep())
        return hub

    def subscription_path(self, topic: str) -> str:
        name = f"{self.prefix}{self.host}.{self.pid}.{self.token}.{topic[:150]}"
        return f"projects/{self.settings.project}/subscriptions/{name}"

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- subscribers ----------------------------------------------------------------------

    def subscribe(self, topic: str, *, heartbeat: float | None = None) -> _Subscription:
        """``async with hub.subscribe(topic) as listener``: a listener receiving every message
        published to ``topic`` from now on.

        Raises (on entering):
            TopicNotFound: the topic does not exist.
            Unavailable: Pub/Sub cannot be reached, or the worker is shutting down.
        """
        return _Subscription(self, topic, heartbeat)

    async def _enter(self, topic: str, heartbeat: float | None) -> tuple[_Feed, Listener]:
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
            bell=feed.bell,
        )
        feed.listeners.add(listener)
        try:
            assert feed.created is not None
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    await asyncio.shield(feed.created)
            except TimeoutError:
                raise Unavailable(f"subscribing to topic {topic!r} timed out") from None
        except BaseException:
            self._leave(feed, listener, counted=False)
            raise
        feed.subscribers_gauge.inc()
        return feed, listener

    def _leave(self, feed: _Feed, listener: Listener, *, counted: bool = True) -> None:
        feed.listeners.discard(listener)
        if listener.delivered:
            feed.deliveries.inc(listener.delivered)
            listener.delivered = 0
        if counted:
            feed.subscribers_gauge.dec()
        topic = feed.topic
        if not feed.listeners and not self._closing and self._feeds.get(topic) is feed:
            if feed.created is not None and feed.created.done() and feed.created.exception():
                self._feeds.pop(topic)
            else:
                feed.linger = self._loop.call_later(
                    self.settings.fanout_grace, self._retire_later, feed
                )

    def _open(self, topic: str) -> _Feed:
        feed = _Feed(topic, self.subscription_path(topic))
        feed.bell.refill = lambda: self._refill(feed)
        feed.subscribers_gauge = metrics.STREAM_SUBSCRIBERS.labels(topic=topic)
        feed.drops = metrics.STREAM_DROPS.labels(topic=topic, reason="dropped")
        feed.deliveries = metrics.STREAM_DELIVERIES.labels(topic=topic)
        feed.created = self._spawn(self._start_feed(feed))
        # Retrieved here so that a failure no subscriber awaits is not reported as unretrieved.
        feed.created.add_done_callback(lambda task: task.cancelled() or task.exception())
        return feed

    async def _start_feed(self, feed: _Feed) -> None:
        await self._create_subscription(feed)
        assert self.streaming is not None
        flow = pubsub_v1.types.FlowControl(max_messages=self.settings.fanout_max_outstanding)
        feed.pull = StreamingPull(
            self.streaming,
            feed.subscription,
            lambda messages: self._dispatch(feed, messages),
            flow,
            prepare=lambda: self._create_subscription(feed, again=True),
            inline=True,
        )
        feed.pull.start()

    async def _create_subscription(self, feed: _Feed, *, again: bool = False) -> None:
        request = Subscription(
            name=feed.subscription,
            topic=self.settings.topic_path(feed.topic),
            labels={
                "loopgate": "fanout",
                "host": _label(self.host),
                "pid": str(self.pid),
                "topic": _label(feed.topic),
            },
            expiration_policy=ExpirationPolicy(ttl=EXPIRATION),
            message_retention_duration=RETENTION,
            ack_deadline_seconds=10,
        )
        try:
            await self.admin.create_subscription(request=request, timeout=10)
        except gexc.AlreadyExists:
            return
        except gexc.GoogleAPICallError as exc:
            raise translate(exc, topic=feed.topic) from exc
        if not again:
            metrics.FANOUT_SUBSCRIPTIONS.inc()
        log.info("created fan-out subscription %s", feed.subscription)

    def _dispatch(self, feed: _Feed, messages: list[Any]) -> None:
        """Serialize once and hand to the subscribers (see :meth:`fanout`), which acks them."""
        self.fanout(feed.topic, [encode_message(message) for message in messages], messages)

    def fanout(self, topic: str, frames: list[Frame], messages: list[Any] | None = None) -> None:
        """Put ``frames`` in the queue of every local subscriber of ``topic``.

        ``messages``, the Pub/Sub messages the frames came from, are acked once the frames are in
        every subscriber's queue (at once when the topic has no subscriber here).

        Handing messages to the subscribers costs one websocket frame per subscriber, whatever the
        number of messages: so the hub does it at most once per ``subscribers / stream_frame_rate``
        seconds (at most ``stream_max_coalesce_delay``, and not once ``stream_queue_size`` or
        half of ``fanout_max_outstanding`` messages wait). A message arriving after a quiet spell
        goes out at once; messages arriving faster share frames.
        """
        feed = self._feeds.get(topic)
        if feed is None or not feed.listeners:
            for message in messages or ():
                message.ack()
            return
        feed.pending.extend(frames)
        if messages:
            feed.unacked.extend(messages)
        settings = self.settings
        if feed.flush is not None:
            if len(feed.pending) < min(
                settings.stream_queue_size, settings.fanout_max_outstanding // 2
            ):
                return
            # No queue holds more than this, and the pull's flow control stops at its
            # outstanding bound while these wait unacked: waiting longer would only stall.
            feed.flush.cancel()
            self._flush(feed)
            return
        delay = self._next_flush(feed) - self._loop.time()
        if delay <= 0:
            self._flush(feed)
        else:
            feed.flush = self._loop.call_later(delay, self._flush, feed)

    def _flush(self, feed: _Feed) -> None:
        feed.flush = None
        feed.flushed = self._loop.time()
        self._collect(feed)
        if feed.pending:
            self._hand_over(feed)
        elif not feed.unrung:
            return
        feed.unrung = False
        feed.bell.ring()

    def _collect(self, feed: _Feed) -> None:
        """Take what the stream thread handed over whose wake-up has not run yet: a loop busy
        writing runs timers and running tasks first, and these would wait for the next round."""
        if feed.pull is not None and feed.pull.arrived:
            arrived = feed.pull.collect()
            feed.pending.extend(encode_message(message) for message in arrived)
            feed.unacked.extend(arrived)

    def _hand_over(self, feed: _Feed, *, extend: bool = False) -> None:
        """Put the pending frames in every subscriber's queue, then ack their messages."""
        frames, feed.pending = feed.pending, []
        unacked, feed.unacked = feed.unacked, []
        chunk = Chunk(frames)
        extending = None
        if extend and feed.chunk is not None:
            extending = (feed.chunk, Chunk(feed.chunk.frames + frames))
        dropped = 0
        for listener in tuple(feed.listeners):
            dropped += listener.put_many(frames, chunk, wake=False, extending=extending)
        feed.chunk = chunk
        for message in unacked:
            message.ack()
        if dropped:
            feed.drops.inc(dropped)

    def _refill(self, feed: _Feed) -> None:
        """Called by each subscriber as it wakes to write: messages that arrived while the loop
        was writing this round go into every queue now. Subscribers further along the round send
        them in the frame they are about to write; the others get them when the round they started
        ends (the bell rings then), not a round later."""
        if feed.pull is None or not feed.pull.arrived or not feed.listeners:
            return
        self._collect(feed)
        self._hand_over(feed, extend=True)
        feed.unrung = True
        if feed.flush is None:
            delay = max(0.0, self._next_flush(feed) - self._loop.time())
            feed.flush = self._loop.call_later(delay, self._flush, feed)

    def _next_flush(self, feed: _Feed) -> float:
        """When the topic's next hand-over may be, on the loop's clock: ``subscribers /
        stream_frame_rate`` seconds after the last, at most ``stream_max_coalesce_delay``."""
        settings = self.settings
        interval = min(
            settings.stream_max_coalesce_delay, len(feed.listeners) / settings.stream_frame_rate
        )
        return feed.flushed + interval

    # -- retiring subscriptions -----------------------------------------------------------

    def _retire_later(self, feed: _Feed) -> None:
        feed.linger = None
        if self._feeds.get(feed.topic) is feed and not feed.listeners:
            del self._feeds[feed.topic]
            if feed.flush is not None:
                feed.flush.cancel()
            self._spawn(self._retire(feed))

    async def _retire(self, feed: _Feed) -> None:
        if feed.created is not None and not feed.created.done():
            feed.created.cancel()
        if feed.pull is not None:
            await feed.pull.stop()
        if feed.created is None or feed.created.cancelled() or feed.created.exception():
            return
        try:
            await self.admin.delete_subscription(subscription=feed.subscription, timeout=10)
            log.info("deleted fan-out subscription %s", feed.subscription)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            log.warning("deleting %s failed (it expires by itself): %s", feed.subscription, exc)
        metrics.FANOUT_SUBSCRIPTIONS.dec()

    def begin_shutdown(self) -> None:
        """Close every subscriber with 1001, then delete the subscriptions (in the background)."""
        if self._closing:
            return
        self._closing = True
        feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            if feed.linger is not None:
                feed.linger.cancel()
            if feed.flush is not None:
                feed.flush.cancel()
            for listener in tuple(feed.listeners):
                listener.close(CLOSE_GOING_AWAY, "server shutting down")
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
                for listener in tuple(feed.listeners):
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

    async def sweep(self) -> list[str]:
        """Delete leftover fan-out subscriptions of this prefix and host; returns their paths."""
        deleted: list[str] = []
        try:
            pager = await self.admin.list_subscriptions(
                project=f"projects/{self.settings.project}", timeout=10
            )
            async for subscription in pager:
                if self._is_leftover(subscription):
                    with contextlib.suppress(gexc.NotFound):
                        await self.admin.delete_subscription(
                            subscription=subscription.name, timeout=10
                        )
                    deleted.append(subscription.name)
        except gexc.GoogleAPICallError as exc:
            log.warning("sweeping leftover fan-out subscriptions failed: %s", exc)
        if deleted:
            log.info("deleted %d leftover fan-out subscriptions", len(deleted))
        return deleted

    def _is_leftover(self, subscription: Subscription) -> bool:
        name = subscription.name.rsplit("/", 1)[-1]
        if not name.startswith(self.prefix):
            return False
        if subscription.topic == "_deleted-topic_":
            return True
        parts = name[len(self.prefix) :].split(".", 3)
        if len(parts) < 4 or parts[0] != self.host or not parts[1].isdigit():
            return False
        pid, token = int(parts[1]), parts[2]
        if pid == self.pid:
            return token != self.token
        return not _alive(pid)


class _Subscription:
    """What :meth:`Hub.subscribe` returns. A class rather than ``@asynccontextmanager``: the
    generator of the latter would stay alive, with its frame, for as long as each connection."""

    __slots__ = ("_entered", "_heartbeat", "_hub", "_topic")

    def __init__(self, hub: Hub, topic: str, heartbeat: float | None) -> None:
        self._hub = hub
        self._topic = topic
        self._heartbeat = heartbeat
        self._entered: tuple[_Feed, Listener] | None = None

    async def __aenter__(self) -> Listener:
        self._entered = await self._hub._enter(self._topic, self._heartbeat)
        return self._entered[1]

    async def __aexit__(self, *exc_info: object) -> None:
        if self._entered is not None:
            feed, listener = self._entered
            self._entered = None
            self._hub._leave(feed, listener)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _close_hub(hub: Hub) -> None:
    await hub.aclose()


FANOUT: ClientSpec[Hub] = ClientSpec("fanout", create=Hub.create, close=_close_hub)
