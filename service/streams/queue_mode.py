"""Queue mode: one websocket consumes an existing subscription, acking and nacking by ``ackId``.

Each connection runs its own streaming pull on the subscription, so several connections share its
messages the way Pub/Sub consumers do. The threaded client's flow control caps the messages a
connection holds (``queue_max_outstanding``) and its lease management extends their ack deadlines
while the client holds them, up to ``queue_max_lease`` seconds; after that Pub/Sub redelivers them.
A nack, and every message still held when the connection ends, is nacked so Pub/Sub redelivers it
at once (at-least-once). When the connection ends, its stream is ended gracefully first (the request
side closed, then read until Pub/Sub ends it; see :mod:`service.clients.pubsub.streaming_pull`), and only then
are the messages it held, and any that arrived meanwhile, nacked with a unary call. Nacked while the
stream was open, Pub/Sub could hand them straight back to it; and a stream that is merely cancelled
can for a while (on the emulator, for minutes) still be handed messages that nobody then sees until
its ack deadline passes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1 import SubscriberAsyncClient

from ..clients.pubsub.streaming_pull import StreamingPull
from ..config import Settings
from ..errors import CLOSE_GOING_AWAY, StreamClosed
from .frames import encode_message

log = logging.getLogger("loopgate.queue")

CLOSE_DRAIN = 5.0  # the longest a closing connection waits for Pub/Sub to end its stream


class QueueConsumer:
    """The messages of one subscription for one connection."""

    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        admin: SubscriberAsyncClient,
        subscription: str,
        settings: Settings,
    ) -> None:
        self._admin = admin
        self._subscription = subscription
        self._late: list[Any] = []
        self._loop = asyncio.get_running_loop()
        self._incoming: deque[Any] = deque()
        self._held: dict[str, tuple[Any, float]] = {}
        self._notices: list[str] = []
        self._waiter: asyncio.Future[None] | None = None
        self._max_lease = settings.queue_max_lease
        self.closed: StreamClosed | None = None
        flow = pubsub_v1.types.FlowControl(
            max_messages=settings.queue_max_outstanding,
            max_lease_duration=settings.queue_max_lease,
        )
        self.pull = StreamingPull(client, subscription, self._on_messages, flow)

    def start(self) -> None:
        self.pull.start()

    def _on_messages(self, messages: list[Any]) -> None:
        if self.closed is not None:
            self._late.extend(messages)
            return
        self._incoming.extend(messages)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def notify(self, text: str) -> None:
        """Queue a control frame (an error answer) for the writer."""
        self._notices.append(text)
        self._wake()

    def shutdown(self) -> None:
        self.close(CLOSE_GOING_AWAY, "server shutting down")

    def close(self, code: int, reason: str) -> None:
        if self.closed is None:
            self.closed = StreamClosed(code, reason)
            self._wake()

    async def get(self) -> list[str]:
        """The next frames to send: notices, then every waiting message as one frame each.

        Raises:
            StreamClosed: the server ends the stream.
        """
        while True:
            if self.closed is not None:
                raise self.closed
            if self._notices or self._incoming:
                texts, self._notices = self._notices, []
                now = self._loop.time()
                while self._incoming:
                    message = self._incoming.popleft()
                    self._held[message.ack_id] = (message, now)
                    texts.append(encode_message(message, ack_id=message.ack_id).text)
                self._forget_expired(now)
                return texts
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _forget_expired(self, now: float) -> None:
        # Past the maximum lease the client library lets go of a message and Pub/Sub redelivers it.
        expired = [
            ack_id for ack_id, (_, since) in self._held.items() if now - since > self._max_lease
        ]
        for ack_id in expired:
            del self._held[ack_id]

    def settle(self, ack_ids: list[str], *, ack: bool) -> list[str]:
        """Ack (or nack) held messages; returns the ids that are not held."""
        unknown = []
        for ack_id in ack_ids:
            entry = self._held.pop(ack_id, None)
            if entry is None:
                unknown.append(ack_id)
            elif ack:
                entry[0].ack()
            else:
                entry[0].nack()
        return unknown

    async def aclose(self) -> None:
        """End the stream, then nack everything held, not yet sent, or received while closing."""
        self.close(CLOSE_GOING_AWAY, "connection closed")
        # Until Pub/Sub has ended the stream it may hand a nacked message straight back to it;
        # nacked after its end, it goes to the other consumers (or waits for the next one).
        never_handed = await self.pull.stop(drain=CLOSE_DRAIN)
        ack_ids = [
            *self._held,
            *(m.ack_id for m in (*self._incoming, *self._late, *never_handed)),
        ]
        self._held.clear()
        self._incoming.clear()
        self._late.clear()
        await self._nack(ack_ids)

    async def _nack(self, ack_ids: list[str]) -> None:
        for start in range(0, len(ack_ids), 1000):
            try:
                await self._admin.modify_ack_deadline(
                    subscription=self._subscription,
                    ack_ids=ack_ids[start : start + 1000],
                    ack_deadline_seconds=0,
                    timeout=10,
                )
            except gexc.GoogleAPICallError as exc:
                log.warning("nacking held messages failed (they return at their deadline): %s", exc)
