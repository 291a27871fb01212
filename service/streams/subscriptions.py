"""The worker's own Pub/Sub subscriptions for the fan-out: their names, creation, deletion and sweep.

Every worker of every instance holds its own subscription to each topic it has subscribers of, so
every subscriber everywhere receives every message. The subscription's name tells its host and
worker (``<prefix>-fanout.<host>.<pid>.<token>.<topic>``), it carries labels, Pub/Sub's shortest
expiration policy (1 day of inactivity) and shortest retention (10 minutes), so the subscription of
a worker that crashed disappears by itself. A catch-up subscription (a reconnecting subscriber's
messages from the topic's retention, :mod:`service.streams.catchup`) is named and labelled alike,
``<prefix>-catchup.<host>.<pid>.<token>.<topic>``, and lives only until its subscribers have
caught up. At startup a worker deletes the leftovers of its prefix (:meth:`FanoutSubscriptions.sweep`):
those of its host whose process is gone, and those whose topic was deleted.

A new subscription receives only what is published after its creation; the Pub/Sub emulator
instead hands it every message the topic retains (``message_retention_duration``). Against the
emulator (``PUBSUB_EMULATOR_HOST``) each new fan-out subscription is therefore sought to the time
just before it was created. Not against Pub/Sub: there it is not needed, and a seek to a time marks
every retained message published before it as acknowledged, so a clock of ours ahead of Pub/Sub's
would lose the messages published in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from google.api_core import exceptions as gexc
from google.protobuf import duration_pb2
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
    PublisherGrpcAsyncIOTransport,
)
from google.pubsub_v1.types import ExpirationPolicy, Subscription

from .. import metrics
from ..clients.pubsub.errors import translate
from ..clients.pubsub.specs import emulator_host
from ..config import Settings
from ..errors import ServiceError
from .feed import Feed

log = logging.getLogger("loopgate.fanout")

EXPIRATION = duration_pb2.Duration(seconds=24 * 3600)  # Pub/Sub's minimum
RETENTION = duration_pb2.Duration(seconds=600)  # Pub/Sub's minimum
CATCHUP_ACK_DEADLINE = 60


class FanoutSubscriptions:
    """The fan-out subscriptions of one worker (one event loop of one process).

    Args:
        settings: ``project`` and ``fanout_prefix`` name the subscriptions.
        admin: the Pub/Sub admin client that creates, lists and deletes them.
    """

    def __init__(self, settings: Settings, admin: SubscriberAsyncClient) -> None:
        self.settings = settings
        self.admin = admin
        self.host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
        self.pid = os.getpid()
        self.token = secrets.token_hex(3)  # tells this worker from an earlier one with its pid
        self.prefix = f"{settings.fanout_prefix}-fanout."
        self.catchup_prefix = f"{settings.fanout_prefix}-catchup."
        self.catchups_created = 0  # catch-up subscriptions this worker has made
        self._made = 0
        self._topics: PublisherAsyncClient | None = None

    def path(self, topic: str) -> str:
        """A new path for a subscription of this worker to ``topic``.

        Every feed gets a name of its own (``<token>-<n>``): a topic joined again while its
        previous feed is still being retired must not share that feed's subscription, which the
        retirement deletes (and whose cancelled stream Pub/Sub may still hand messages to).
        """
        return self._path(self.prefix, topic)

    def catchup_path(self, topic: str) -> str:
        """A new path for a catch-up subscription of this worker to ``topic``."""
        return self._path(self.catchup_prefix, topic)

    def _path(self, prefix: str, topic: str) -> str:
        self._made += 1
        name = f"{prefix}{self.host}.{self.pid}.{self.token}-{self._made}.{topic[:150]}"
        return f"projects/{self.settings.project}/subscriptions/{name}"

    async def create(self, feed: Feed, *, again: bool = False) -> None:
        """Create ``feed.subscription`` to ``feed.topic``; one that exists already is kept.

        ``again``: it is created once more (the streaming pull found it gone), so it is not
        counted again in the ``loopgate_fanout_subscriptions`` gauge.

        Raises:
            TopicNotFound: the topic does not exist.
            BackendError: Pub/Sub refused or could not be reached.
        """
        before = time.time()
        try:
            await self.admin.create_subscription(
                request=self._request(feed.subscription, feed.topic, "fanout", 10), timeout=10
            )
        except gexc.AlreadyExists:
            feed.history.restart()
            return
        except gexc.GoogleAPICallError as exc:
            raise translate(exc, topic=feed.topic) from exc
        if emulator_host():
            try:
                await self.seek(feed.subscription, before, topic=feed.topic)
            except ServiceError as exc:
                log.warning("seeking %s to its creation failed: %s", feed.subscription, exc)
        feed.history.restart()
        if not again:
            metrics.FANOUT_SUBSCRIPTIONS.inc()
        log.info("created fan-out subscription %s", feed.subscription)

    async def create_catchup(self, path: str, topic: str) -> None:
        """Create the catch-up subscription ``path`` to ``topic`` (see
        :mod:`service.streams.catchup`).

        Raises:
            TopicNotFound: the topic does not exist.
            BackendError: Pub/Sub refused or could not be reached.
        """
        request = self._request(path, topic, "catchup", CATCHUP_ACK_DEADLINE)
        try:
            await self.admin.create_subscription(request=request, timeout=10)
        except gexc.GoogleAPICallError as exc:
            raise translate(exc, topic=topic) from exc
        self.catchups_created += 1
        metrics.STREAM_CATCHUPS.labels(topic=topic).inc()
        log.info("created catch-up subscription %s", path)

    async def seek(self, path: str, moment: float, *, topic: str) -> None:
        """Seek subscription ``path`` to ``moment`` (seconds since the epoch): what was published
        from then on, as far as the topic retains it, is delivered (again).

        Raises:
            BackendError: Pub/Sub refused or could not be reached.
        """
        at = datetime.fromtimestamp(max(0.0, moment), UTC)
        try:
            await self.admin.seek(request={"subscription": path, "time": at}, timeout=10)
        except gexc.GoogleAPICallError as exc:
            raise translate(exc, topic=topic) from exc

    async def topic_retention(self, feed: Feed) -> float | None:
        """How long Pub/Sub retains the messages of ``feed.topic`` (seconds; 0: not at all;
        ``None``: it could not be read). Read from the worker's subscription, which Pub/Sub tells
        it; the emulator does not, so then from the topic itself."""
        try:
            subscription = await self.admin.get_subscription(
                subscription=feed.subscription, timeout=10
            )
            seconds = _seconds(subscription.topic_message_retention_duration)
            if seconds > 0:
                return float(seconds)
            if self._topics is None:
                # The admin client's own channel, with its credentials: never closed by this.
                channel = self.admin.transport.grpc_channel  # type: ignore[attr-defined]
                transport = PublisherGrpcAsyncIOTransport(channel=channel)
                self._topics = PublisherAsyncClient(transport=transport)
            topic = await self._topics.get_topic(
                topic=self.settings.topic_path(feed.topic), timeout=10
            )
            return _seconds(topic.message_retention_duration)
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            log.warning("reading the retention of topic %s failed: %s", feed.topic, exc)
            return None

    def _request(self, path: str, topic: str, kind: str, ack_deadline: int) -> Subscription:
        return Subscription(
            name=path,
            topic=self.settings.topic_path(topic),
            labels={
                "loopgate": kind,
                "host": _label(self.host),
                "pid": str(self.pid),
                "topic": _label(topic),
            },
            expiration_policy=ExpirationPolicy(ttl=EXPIRATION),
            message_retention_duration=RETENTION,
            ack_deadline_seconds=ack_deadline,
        )

    async def delete(self, feed: Feed) -> None:
        """Delete ``feed.subscription``. A failure is logged, not raised: the
        subscription expires by itself."""
        await self.delete_path(feed.subscription, "fan-out")
        metrics.FANOUT_SUBSCRIPTIONS.dec()

    async def delete_path(self, path: str, kind: str = "catch-up") -> None:
        """Delete subscription ``path``; a failure is logged, not raised."""
        try:
            await self.admin.delete_subscription(subscription=path, timeout=10)
            log.info("deleted %s subscription %s", kind, path)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            log.warning("deleting %s failed (it expires by itself): %s", path, exc)

    async def sweep(self) -> list[str]:
        """Delete the leftover fan-out subscriptions (see :meth:`is_leftover`); returns their
        paths. A failure is logged, not raised: what is left expires by itself."""
        deleted: list[str] = []
        try:
            pager = await self.admin.list_subscriptions(
                project=f"projects/{self.settings.project}", timeout=10
            )
            async for subscription in pager:
                if self.is_leftover(subscription):
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

    def is_leftover(self, subscription: Subscription) -> bool:
        """Whether ``subscription`` is a fan-out or catch-up subscription of this prefix that
        nobody uses: its topic was deleted, or it is of this host and the process it names is
        gone, or it names this process but another token (an earlier hub, or an earlier process
        with this pid)."""
        name = subscription.name.rsplit("/", 1)[-1]
        prefix = next((p for p in (self.prefix, self.catchup_prefix) if name.startswith(p)), None)
        if prefix is None:
            return False
        if subscription.topic == "_deleted-topic_":
            return True
        parts = name[len(prefix) :].split(".", 3)
        if len(parts) < 4 or parts[0] != self.host or not parts[1].isdigit():
            return False
        pid, token = int(parts[1]), parts[2].partition("-")[0]
        if pid == self.pid:
            return token != self.token
        return not _alive(pid)


def _seconds(duration: Any) -> float:
    """A duration field as seconds: proto-plus gives a ``timedelta``, typed as a ``Duration``."""
    if isinstance(duration, timedelta):
        return float(duration.total_seconds())
    return float(duration.seconds) + float(duration.nanos) / 1e9


def _label(value: str) -> str:
    """``value`` as a Pub/Sub label value: lower case letters, digits, ``_`` and ``-``."""
    return re.sub(r"[^a-z0-9_-]", "-", value.lower())[:63]


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
