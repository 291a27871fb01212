"""Catching reconnecting subscribers up from Pub/Sub's retention, one subscription per topic.

A subscriber whose cursor reaches back further than the worker's recent history (it was away
long, or was connected to another worker or instance) waits in the topic's :class:`CatchUp`
while the live stream goes on without it. A catch-up makes one temporary subscription
(:meth:`~service.streams.subscriptions.FanoutSubscriptions.create_catchup`: labelled, the
shortest expiration, swept like the fan-out's) and serves its subscribers in rounds: every
subscriber waiting when a round starts is in it, so a storm of resumes after a deploy costs one
subscription per topic per worker, not one per client. A round:

1. seeks the subscription to the earliest cursor of the round, less the slack
   (``LOOPGATE_STREAM_RESUME_SLACK``, :attr:`~service.streams.history.History.slack`), and notes
   the time, the *seam*;
2. pulls pages of messages, each serialized once and replayed to every subscriber of the round
   whose cursor it follows, until a pull brings nothing published before the seam (plus the
   slack), or nothing within :data:`QUIET_TIMEOUT`; the next page is pulled once every subscriber
   has room for it (the slow-consumer policy applies to one that takes longer than
   :data:`ROOM_WAIT`);
3. joins each subscriber to the live stream, after what the history holds from the seam less the
   slack, leaving out what the round has just replayed to it: near the seam a message comes twice
   only if Pub/Sub delivered it twice. The seam moves later when the history forgets messages
   during the round (its bounds), so that the catch-up reaches what the history still holds
   complete.

Near the cursor, what was published within the slack before it comes again (the subscriber's
previous worker may have sent it in another order): duplicates with their original messageId,
by which clients drop them.

Subscribers arriving during a round wait for the next one; the subscription is deleted once no
one waits. When Pub/Sub fails, the subscribers of the catch-up are closed with 1013: they
reconnect with their cursor and are caught up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from google.api_core import exceptions as gexc
from google.pubsub_v1 import SubscriberAsyncClient

from ..errors import CLOSE_TRY_AGAIN_LATER, ServiceError
from .cursor import Cursor
from .feed import Feed
from .frames import Frame, encode_message
from .subscriber_queue import Listener
from .subscriptions import FanoutSubscriptions

log = logging.getLogger("loopgate.catchup")

PAGE = 1000  # messages per pull (Pub/Sub's maximum)
PULL_TIMEOUT = 5.0  # seconds the first pull after a seek waits for messages
QUIET_TIMEOUT = 1.0  # seconds a later one waits: none by then, the backlog is delivered
ROOM_WAIT = 10.0  # seconds a round waits for its subscribers to make room for a page
ROOM_POLL = 0.02


class CatchUp:
    """The catch-up of one topic's reconnecting subscribers in one worker.

    Args:
        feed: the topic's feed, which they join once caught up.
        subscriptions: the worker's subscriptions (names, creation, seek, deletion).
    """

    def __init__(self, feed: Feed, subscriptions: FanoutSubscriptions) -> None:
        self.feed = feed
        self.subscriptions = subscriptions
        self.admin: SubscriberAsyncClient = subscriptions.admin
        self.path = subscriptions.catchup_path(feed.topic)
        self.waiting: dict[Listener, Cursor] = {}
        self.round: dict[Listener, Cursor] = {}
        self.task: asyncio.Task[None] | None = None  # what runs :meth:`run`, set by the hub
        self._loop = asyncio.get_running_loop()

    def add(self, listener: Listener, cursor: Cursor) -> None:
        """Catch ``listener`` up from ``cursor`` in the next round."""
        self.waiting[listener] = cursor

    def discard(self, listener: Listener) -> None:
        """``listener`` has left."""
        self.waiting.pop(listener, None)
        self.round.pop(listener, None)

    async def run(self) -> None:
        """Serve rounds while subscribers wait, then delete the subscription."""
        creating = self._loop.create_task(
            self.subscriptions.create_catchup(self.path, self.feed.topic)
        )
        try:
            # A create cancelled in flight may still reach Pub/Sub after the delete below.
            await asyncio.shield(creating)
            while self.waiting:
                await self._round()
        except Exception as exc:
            expected = isinstance(exc, ServiceError | gexc.GoogleAPICallError | gexc.RetryError)
            log.warning(
                "catching up subscribers of %s failed: %s",
                self.feed.topic,
                exc,
                exc_info=not expected,
            )
            for listener in (*self.round, *self.waiting):
                listener.close(CLOSE_TRY_AGAIN_LATER, "catching up failed: reconnect")
        finally:
            if self.feed.catchup is self:
                self.feed.catchup = None  # before any await: a later resume starts a new one
            self.round = {}
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.gather(creating, return_exceptions=True))
            if creating.done() and not creating.cancelled() and creating.exception() is None:
                await asyncio.shield(self.subscriptions.delete_path(self.path))

    async def _round(self) -> None:
        members, self.waiting = self.waiting, {}
        self.round = members
        slack = self.feed.history.slack
        start = min(cursor.published for cursor in members.values()) - slack
        seam = time.time()
        await self.subscriptions.seek(self.path, start, topic=self.feed.topic)
        tag, history = self.feed.tag, self.feed.history
        timeout = PULL_TIMEOUT
        near_seam: set[str] = set()  # what the round replayed that the history may hold too
        while self.round:
            await self._room()
            try:
                response = await self.admin.pull(
                    subscription=self.path, max_messages=PAGE, timeout=timeout
                )
                received: list[Any] = list(response.received_messages)
            except (gexc.DeadlineExceeded, gexc.RetryError):
                received = []
            frames = [encode_message(item.message, tag=tag) for item in received]
            # The history may have forgotten messages meanwhile (its bounds): the catch-up then
            # goes on until it reaches what the history still has complete.
            seam = max(seam, history.complete_since)
            limit = seam + slack
            old = [frame for frame in frames if frame.published < limit]
            near_seam.update(f.message_id for f in old if f.published >= seam - slack)
            for listener, cursor in list(self.round.items()):
                since = cursor.published - slack
                listener.replay(
                    [
                        frame
                        for frame in old
                        if frame.published >= since and frame.message_id != cursor.message_id
                    ]
                )
            if received:
                await self.admin.acknowledge(
                    subscription=self.path, ack_ids=[item.ack_id for item in received], timeout=10
                )
            if not old:
                break
            timeout = QUIET_TIMEOUT
        self._join(seam, near_seam)

    def _join(self, seam: float, replayed: set[str]) -> None:
        """Every subscriber of the round joins the live stream after the history since the seam,
        less what the round ``replayed`` to it from there."""
        feed, history = self.feed, self.feed.history
        slack = history.slack
        if history.complete_since > seam + slack:
            log.warning(
                "the recent history of %s did not reach back to its catch-up: raise "
                "LOOPGATE_STREAM_HISTORY_*; messages published around %s may be missing",
                feed.topic,
                time.strftime("%H:%M:%S", time.gmtime(seam)),
            )
        members, self.round = self.round, {}
        for listener, cursor in members.items():
            # Every frame of the round published since then was replayed to this subscriber.
            since = max(cursor.published, seam) - slack
            replay: list[Frame] = [
                frame for frame in history.since(since) if frame.message_id not in replayed
            ]
            feed.join(listener, replay)

    async def _room(self) -> None:
        """Wait until every subscriber of the round has room for a page; then apply the
        slow-consumer policy to the ones that still have not."""
        deadline = self._loop.time() + ROOM_WAIT
        while self._loop.time() < deadline:
            if all(
                listener.backlog + PAGE <= max(listener.capacity, PAGE)
                or listener.closed is not None
                for listener in self.round
            ):
                return
            await asyncio.sleep(ROOM_POLL)
        for listener in self.round:
            listener.trim_backlog()
