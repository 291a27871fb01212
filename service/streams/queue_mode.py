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

What the client sends is read by :meth:`QueueConsumer.read_settlements`: each frame must be
``{"ack": [ackId, ...]}``, ``{"nack": [...]}`` or both. A frame is parsed only if it has at most
``MAX_FRAME_CHARS`` characters (Hypercorn's ``websocket_max_message_size`` closes a larger one with
1009 first) and at most ``MAX_FRAME_BRACKETS`` brackets (one object, two lists: ack ids never
contain brackets), so no frame nests deeply; anything else is answered with an error notice and
changes nothing. Any other failure while reading ends the connection with 1011 and is logged: the
reader never dies silently, leaving acks unread and held messages waiting for their lease to end.

Error notices (``{"type": "error", "message": ...}``) are bounded for a client that does not read
them. An answer to unknown ids echoes at most ``MAX_ECHOED_IDS`` of them, each at most
``MAX_ECHOED_ID_CHARS`` long (the ids Pub/Sub issues are a few hundred bytes; longer ones are not
echoed), and ``count`` says how many there were. At most ``MAX_PENDING_NOTICES`` notices wait for
the writer; past that they are counted instead, and the count is sent after the waiting ones as one
notice ``{"type": "error", "message": ..., "dropped": N}``. The connection stays open: a client
busy with its messages keeps acking, and loses only answers about ids it settled wrongly.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1
from google.pubsub_v1 import SubscriberAsyncClient

from ..clients.pubsub.streaming_pull import StreamingPull
from ..config import Settings
from ..errors import CLOSE_GOING_AWAY, CLOSE_INTERNAL_ERROR, StreamClosed
from .frames import encode_message

log = logging.getLogger("loopgate.queue")

CLOSE_DRAIN = 5.0  # the longest a closing connection waits for Pub/Sub to end its stream
MAX_FRAME_CHARS = 262_144  # the longest settlement frame parsed
MAX_FRAME_BRACKETS = 3  # ``{"ack": [...], "nack": [...]}``
MAX_PENDING_NOTICES = 8  # notices waiting for the writer; more are counted, not kept
MAX_ECHOED_IDS = 10  # unknown ids echoed in one notice
MAX_ECHOED_ID_CHARS = 512  # an unknown id longer than this is counted, not echoed

_EXPECTED = 'expected {"ack": [ackId, ...]} or {"nack": [...]}'


def parse_settlement(raw: str | bytes) -> dict[str, list[str]] | None:
    """The ack and nack ids of a client frame; None when the frame is not a settlement."""
    if len(raw) > MAX_FRAME_CHARS:
        return None
    try:
        text = raw if isinstance(raw, str) else raw.decode()
        if text.count("[") + text.count("{") > MAX_FRAME_BRACKETS:
            return None
        body = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError
        return None  # cannot happen within the bracket bound, and must not kill the reader
    if not isinstance(body, dict) or not body or not set(body) <= {"ack", "nack"}:
        return None
    for ids in body.values():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return None
    return body


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
        self._notices_dropped = 0
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

    def notify(self, notice: dict[str, Any]) -> None:
        """Queue a control frame (an error answer) for the writer, or count it when
        ``MAX_PENDING_NOTICES`` already wait."""
        if len(self._notices) < MAX_PENDING_NOTICES:
            self._notices.append(json.dumps(notice))
        else:
            self._notices_dropped += 1
        self._wake()

    async def read_settlements(self, receive: Callable[[], Awaitable[str | bytes]]) -> None:
        """Settle what the client sends (each frame from ``receive``) until cancelled; an
        unexpected error is logged and closes the connection with 1011."""
        try:
            while True:
                self.settle_frame(await receive())
        except Exception:
            log.exception("reading a queue-mode client's frames failed; closing the connection")
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def settle_frame(self, raw: str | bytes) -> None:
        """Ack and nack what one client frame names; answer what cannot be settled."""
        body = parse_settlement(raw)
        if body is None:
            self.notify({"type": "error", "message": _EXPECTED})
            return
        for key in ("ack", "nack"):
            unknown = self.settle(body.get(key, []), ack=key == "ack")
            if unknown:
                echoed = [i for i in unknown if len(i) <= MAX_ECHOED_ID_CHARS][:MAX_ECHOED_IDS]
                self.notify(
                    {
                        "type": "error",
                        "message": f"{key}: unknown ackIds",
                        "ackIds": echoed,
                        "count": len(unknown),
                    }
                )

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
            if self._notices or self._notices_dropped or self._incoming:
                texts, self._notices = self._notices, []
                if self._notices_dropped:
                    texts.append(_dropped_notice(self._notices_dropped))
                    self._notices_dropped = 0
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


def _dropped_notice(count: int) -> str:
    return json.dumps(
        {
            "type": "error",
            "message": f"{count} error notices dropped: the client does not read them",
            "dropped": count,
        }
    )
