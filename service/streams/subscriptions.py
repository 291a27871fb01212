"""The worker's own Pub/Sub subscriptions for the fan-out: their names, creation, deletion and sweep.

Every worker of every instance holds its own subscription to each topic it has subscribers of, so
every subscriber everywhere receives every message. The subscription's name tells its host and
worker (``<prefix>-fanout.<host>.<pid>.<token>.<topic>``), it carries labels, Pub/Sub's shortest
expiration policy (1 day of inactivity) and shortest retention (10 minutes), so the subscription of
a worker that crashed disappears by itself. At startup a worker deletes the leftovers of its prefix
(:meth:`FanoutSubscriptions.sweep`): those of its host whose process is gone, and those whose topic
was deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket

from google.api_core import exceptions as gexc
from google.protobuf import duration_pb2
from google.pubsub_v1 import SubscriberAsyncClient
from google.pubsub_v1.types import ExpirationPolicy, Subscription

from .. import metrics
from ..clients.pubsub.errors import translate
from ..config import Settings
from .feed import Feed

log = logging.getLogger("loopgate.fanout")

EXPIRATION = duration_pb2.Duration(seconds=24 * 3600)  # Pub/Sub's minimum
RETENTION = duration_pb2.Duration(seconds=600)  # Pub/Sub's minimum


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
        self._made = 0

    def path(self, topic: str) -> str:
        """A new path for a subscription of this worker to ``topic``.

        Every feed gets a name of its own (``<token>-<n>``): a topic joined again while its
        previous feed is still being retired must not share that feed's subscription, which the
        retirement deletes (and whose cancelled stream Pub/Sub may still hand messages to).
        """
        self._made += 1
        name = f"{self.prefix}{self.host}.{self.pid}.{self.token}-{self._made}.{topic[:150]}"
        return f"projects/{self.settings.project}/subscriptions/{name}"

    async def create(self, feed: Feed, *, again: bool = False) -> None:
        """Create ``feed.subscription`` to ``feed.topic``; one that exists already is kept.

        ``again``: it is created once more (the streaming pull found it gone), so it is not
        counted again in the ``loopgate_fanout_subscriptions`` gauge.

        Raises:
            TopicNotFound: the topic does not exist.
            BackendError: Pub/Sub refused or could not be reached.
        """
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

    async def delete(self, feed: Feed) -> None:
        """Delete ``feed.subscription``. A failure is logged, not raised: the
        subscription expires by itself."""
        try:
            await self.admin.delete_subscription(subscription=feed.subscription, timeout=10)
            log.info("deleted fan-out subscription %s", feed.subscription)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            log.warning("deleting %s failed (it expires by itself): %s", feed.subscription, exc)
        metrics.FANOUT_SUBSCRIPTIONS.dec()

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
        """Whether ``subscription`` is a fan-out subscription of this prefix that nobody uses: its
        topic was deleted, or it is of this host and the process it names is gone, or it names
        this process but another token (an earlier hub, or an earlier process with this pid)."""
        name = subscription.name.rsplit("/", 1)[-1]
        if not name.startswith(self.prefix):
            return False
        if subscription.topic == "_deleted-topic_":
            return True
        parts = name[len(self.prefix) :].split(".", 3)
        if len(parts) < 4 or parts[0] != self.host or not parts[1].isdigit():
            return False
        pid, token = int(parts[1]), parts[2].partition("-")[0]
        if pid == self.pid:
            return token != self.token
        return not _alive(pid)


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
