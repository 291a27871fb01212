"""Subscribers: websocket and Server-Sent Events streams of a topic, and queue mode.

``GET /v1/topics/{topic}/stream`` (websocket). The first frame is ``{"type": "subscribed", "topic":
..., "id": "<cursor>", "resumed": false, "complete": true}`` (see *Resuming* below); every message
published to the topic after it follows as a text frame::

    {"type": "message", "id": "<cursor>", "messageId": "...", "data": "<base64>",
     "attributes": {...}, "orderingKey": "", "publishTime": "2025-01-01T00:00:00.123456Z"}

When several messages wait for one connection they arrive together in one frame, in order:
``{"type": "messages", "messages": [<message>, ...]}`` (each item exactly as a single ``message``
frame, ``id`` included). A connection that reads too slowly loses its oldest waiting messages and is
told ``{"type": "dropped", "count": N}`` (``LOOPGATE_STREAM_SLOW_POLICY=drop-oldest``, the default),
or is closed with 1013 (``close``). Frames the client sends are read and ignored. At shutdown the
server closes with 1001; after ``LOOPGATE_STREAM_IDLE_TIMEOUT`` seconds without traffic either way,
with 1000.

``GET /v1/topics/{topic}/events`` (``text/event-stream``): the same stream as SSE. The first event is
the ``subscribed`` JSON, with its ``id:``; then each message is an event with ``id:`` its cursor
and ``data:`` the same JSON as the websocket frame (never coalesced), a drop notice is an event
without id, and a comment line is sent as a heartbeat every ``LOOPGATE_STREAM_HEARTBEAT`` seconds.

Resuming. Every message's ``id`` is an opaque, URL-safe cursor of at most 200 bytes
(:mod:`service.streams.cursor`) that any worker of any instance understands. A client that
reconnects (Cloud Run ends websockets after 60 minutes; a deploy closes them all with 1001) passes
the ``id`` of the last message it received: ``?lastEventId=<id>`` on the websocket, the
``Last-Event-ID`` header (what browsers' ``EventSource`` sends by itself) or ``?lastEventId=`` for
SSE; before the first message, the ``id`` of the ``subscribed`` frame (the cursor it resumed from,
or one of the moment it subscribed). A cursor that is malformed, or of another topic, is refused
with 400 before the stream starts.
The stream then starts with ``"resumed": true`` and sends first what was published after the cursor,
then the live stream, with no gap between them:

- from the worker's recent history of the topic when the reconnect is to the same worker and
  short (``LOOPGATE_STREAM_HISTORY_MESSAGES``, ``..._BYTES``, ``..._SECONDS``), with no Pub/Sub call;
- otherwise from the topic's message retention in Pub/Sub (``message_retention_duration`` on the
  topic, which resuming needs): one temporary catch-up subscription per topic per worker, however
  many clients resume at once (:mod:`service.streams.catchup`).

``"complete": false`` says that not everything since the cursor could be found (the topic retains
no messages, or not for that long); ``"earliest"`` then gives the earliest publish time from which
messages are still available, and what is available from there follows, then the live stream.
Near the cursor and near the point where a replay joins the live stream, messages may come twice:
they carry their original ``messageId``, by which a client drops duplicates (Pub/Sub delivers at
least once anyway). Messages lost to the slow-consumer policy during a replay are reported with a
``dropped`` notice as usual. When catching up from Pub/Sub fails, the stream is closed with 1013:
reconnect with the same cursor.

``GET /v1/subscriptions/{subscription}/stream`` (websocket, queue mode): the messages of an existing
subscription (allowed by ``LOOPGATE_SUBSCRIPTIONS``), each frame a ``message`` with an ``ackId``.
The client answers ``{"ack": [ackId, ...]}`` or ``{"nack": [ackId, ...]}``; unknown ids and frames
that are not settlements are answered with ``{"type": "error", ...}`` (bounded for a client that does
not read them), and a failure to read the client's frames closes with 1011. See
:mod:`service.streams.queue_mode`.

Errors before the stream starts are answered as HTTP errors: 400 bad name, 404 topic/subscription
not served or missing, 503 (``Retry-After``) when Pub/Sub is down, at the connection limit
(``LOOPGATE_STREAM_MAX_CONNECTIONS``) or shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from google.api_core import exceptions as gexc
from quart import Blueprint, Response, has_websocket_context, request, websocket
from quart_schema import document_response

from .. import metrics
from ..auth.access import current_identity, requires
from ..auth.limits import connection_slot, current_limiter
from ..clients.pubsub.errors import translate
from ..clients.pubsub.specs import SUBSCRIBER
from ..clients.pubsub.streaming_pull import STREAMING
from ..config import current_settings
from ..error_responses import close_frame
from ..errors import (
    CLOSE_TRY_AGAIN_LATER,
    ErrorResponse,
    InvalidArgument,
    StreamClosed,
    SubscriptionNotFound,
)
from ..server.quart_connections import WEBSOCKET_SEND_KEY
from ..streams.cursor import Cursor, decode_cursor, encode_cursor, topic_tag
from ..streams.frames import Batch, dropped_text, websocket_texts
from ..streams.gate import GATE
from ..streams.hub import FANOUT
from ..streams.queue_mode import QueueConsumer
from ..streams.subscriber_queue import Listener
from .publish import TOPIC_NAME, check_topic

blueprint = Blueprint("stream", __name__)


def _subscribed(**fields: object) -> str:
    return json.dumps({"type": "subscribed", **fields})


def _cursor(topic: str, *, header: str | None = None) -> tuple[Cursor | None, str]:
    """The resume cursor a reconnecting subscriber passed (``lastEventId``, or for SSE the
    ``Last-Event-ID`` header), checked before the stream starts, and the ``id`` of the stream's
    ``subscribed`` frame: that cursor, or for a new subscriber one of this moment, so that a
    client that reconnects before its first message still resumes.

    Raises:
        InvalidArgument: it is not a cursor of this topic's stream.
    """
    value = header or request_args().get("lastEventId")
    if not value:
        return None, encode_cursor(topic_tag(topic), int(time.time() * 1e6), "")
    return decode_cursor(value, topic), value


def request_args() -> Any:
    """The query arguments of the current websocket or request."""
    return websocket.args if has_websocket_context() else request.args


LATENCY_SAMPLES_PER_SECOND = 100
_latency_due = [0.0]  # time.time() from which the next frame's latency is recorded


def _record(batch: Batch, listener: Listener) -> None:
    """Count the messages written (the hub adds them to the metric every second) and record the
    latency of at most ``LATENCY_SAMPLES_PER_SECOND`` frames per worker: a metric update per frame
    would cost about as much as writing the frame."""
    frames = batch.frames
    if frames:
        listener.delivered += len(frames)
        now = time.time()
        if now >= _latency_due[0]:
            _latency_due[0] = now + 1 / LATENCY_SAMPLES_PER_SECOND
            metrics.STREAM_LATENCY.observe(max(0.0, now - frames[0].published))


async def _read_and_ignore(listener: Listener) -> None:
    while True:
        await websocket.receive()
        listener.touch()


@blueprint.websocket("/v1/topics/<topic>/stream")
@requires("subscribe", "topic")
async def topic_stream(topic: str) -> None:
    """Every message published to ``topic``, as websocket frames."""
    check_topic(topic)
    cursor, start = _cursor(topic)
    gate = await GATE.get()
    hub = await FANOUT.get()
    with gate.connection():
        async with connection_slot(), hub.subscribe(topic, cursor=cursor) as listener:
            await websocket.accept()
            fields = listener.resumption.fields()
            await websocket.send(_subscribed(topic=topic, id=start, **fields))
            send: Any = websocket.scope.get(
                WEBSOCKET_SEND_KEY
            )  # None: not served through create_app()
            reader = asyncio.ensure_future(_read_and_ignore(listener))
            try:
                while True:
                    try:
                        batch = await listener.get()
                    except StreamClosed as closed:
                        if closed.code == CLOSE_TRY_AGAIN_LATER:
                            metrics.STREAM_DROPS.labels(topic=topic, reason="closed").inc()
                        await websocket.close(*close_frame(closed))
                        return
                    for text in websocket_texts(batch):
                        if send is None:
                            await websocket.send(text)
                        else:
                            await send({"type": "websocket.send", "bytes": None, "text": text})
                    _record(batch, listener)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)


@blueprint.get("/v1/topics/<topic>/events")
@requires("subscribe", "topic", query_token=True)
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 429)
@document_response(ErrorResponse, 503)
async def topic_events(topic: str) -> Response:
    """Every message published to ``topic``, as Server-Sent Events."""
    check_topic(topic)
    cursor, start = _cursor(topic, header=request.headers.get("Last-Event-ID"))
    gate = await GATE.get()
    hub = await FANOUT.get()
    gate.admit()
    identity, limiter = current_identity(), current_limiter()
    limiter.check_slot(identity)  # refused as an HTTP 429 before the stream starts
    # Subscribe once here so that a missing topic or a Pub/Sub outage is an HTTP error; the
    # stream subscribes again when it starts (the subscription is kept for the grace period).
    async with hub.subscribe(topic):
        pass
    heartbeat = current_settings().stream_heartbeat

    async def events() -> AsyncIterator[bytes]:
        with gate.connection():
            async with (
                # The body is sent outside the app context: use what the handler found.
                limiter.slot(identity),
                hub.subscribe(topic, heartbeat=heartbeat, cursor=cursor) as listener,
            ):
                subscribed = _subscribed(topic=topic, id=start, **listener.resumption.fields())
                yield f"retry: 1000\nid: {start}\ndata: {subscribed}\n\n".encode()
                while True:
                    try:
                        batch = await listener.get()
                    except StreamClosed:
                        return
                    yield _sse(batch)
                    _record(batch, listener)

    response = Response(
        events(),
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.timeout = None  # a stream has no response timeout
    return response


def _sse(batch: Batch) -> bytes:
    if batch.heartbeat:
        return b": heartbeat\n\n"
    parts = [f"data: {dropped_text(batch.dropped)}\n\n"] if batch.dropped else []
    parts.extend(f"id: {frame.event_id}\ndata: {frame.text}\n\n" for frame in batch.frames)
    return "".join(parts).encode()


def check_subscription(subscription: str) -> str:
    """Validate a subscription's short name and the allowlist; returns its full path."""
    if not TOPIC_NAME.fullmatch(subscription) or subscription.startswith("goog"):
        raise InvalidArgument(f"invalid subscription name {subscription[:300]!r}")
    settings = current_settings()
    if not settings.subscription_allowed(subscription):
        raise SubscriptionNotFound(subscription, reason="is not served here")
    return f"projects/{settings.project}/subscriptions/{subscription}"


@blueprint.websocket("/v1/subscriptions/<subscription>/stream")
@requires("subscribe", "subscription")
async def subscription_stream(subscription: str) -> None:
    """Queue mode: the messages of an existing subscription, acked or nacked by the client."""
    path = check_subscription(subscription)
    gate = await GATE.get()
    admin = await SUBSCRIBER.get()
    try:
        await admin.get_subscription(subscription=path, timeout=10)
    except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
        raise translate(exc, subscription=subscription) from exc
    client = await STREAMING.get()
    current_limiter().check_slot(current_identity())
    async with connection_slot():
        with gate.connection():
            consumer = QueueConsumer(client, admin, path, current_settings())
            gate.on_close(consumer.shutdown)
            reader: asyncio.Future[None] | None = None
            try:
                await websocket.accept()
                await websocket.send(_subscribed(subscription=subscription))
                consumer.start()
                reader = asyncio.ensure_future(consumer.read_settlements(websocket.receive))
                while True:
                    try:
                        texts = await consumer.get()
                    except StreamClosed as closed:
                        await websocket.close(*close_frame(closed))
                        return
                    for text in texts:
                        await websocket.send(text)
            finally:
                gate.discard(consumer.shutdown)
                if reader is not None:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(consumer.aclose())
