"""The Python client (service.sdk): its SSE parser, frames, backoff and dedupe on their own;
against real loopgate servers and the Pub/Sub emulator (delivery, a restart resumed, refusals);
and against a tiny aiohttp server for the close codes and statuses a real server cannot be made
to produce on demand (1008, 1013, 503 and 429 with Retry-After, scripted duplicates)."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from authkit import new_token, write_tokens
from conftest import PROJECT, WAIT, PubSubAdmin, Server, make_settings, spawn_server, wait_until_up
from google.protobuf import duration_pb2

from service import create_app
from service.sdk import (
    BadRequest,
    Dropped,
    Forbidden,
    Message,
    NotFound,
    PolicyViolation,
    ProtocolError,
    Reconnecting,
    Status,
    Subscribed,
    SubscribeError,
    Subscription,
    Unauthorized,
    subscribe,
)
from service.sdk.messages import decode_frame
from service.sdk.sse import Event, ParseError, SSEParser
from service.sdk.subscriber import Backoff, Dedupe, retry_after

TRANSPORTS = ["websocket", "sse"]

# -- the SSE parser ---------------------------------------------------------------------------

STREAM = (
    b"\xef\xbb\xbfretry: 1000\r\nid: c0\r\ndata: first\r\n\r\n"
    b": heartbeat\n\n"
    b"data: two\ndata:  lines\n\n"
    b"id: c2\revent: other\rdata\r\r"
    b"data: after an event without id\n\n"
    b"id: c3\n\n"  # an id without data: no event, but the id is kept
    b"data: caf\xc3\xa9\n\n"
    b"data: incomplete"
)
EXPECTED = [
    Event("first", id="c0"),
    Event("two\n lines", id="c0"),
    Event("", "other", "c2"),
    Event("after an event without id", id="c2"),
    Event("café", id="c3"),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_the_sse_parser_reads_any_split_of_the_stream(size: int) -> None:
    parser = SSEParser()
    events: list[Event] = []
    for start in range(0, len(STREAM), size):
        events += parser.feed(STREAM[start : start + size])
    assert events == EXPECTED
    assert parser.retry == 1000 and parser.last_event_id == "c3"


def test_a_crlf_split_between_chunks_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # the LF of the CRLF, not a blank line
    assert parser.feed(b"\r\n") == [Event("a")]


def test_the_sse_parser_refuses_an_endless_line() -> None:
    parser = SSEParser(max_line=10)
    with pytest.raises(ParseError):
        parser.feed(b"data: " + b"x" * 20)


# -- frames, backoff, dedupe ------------------------------------------------------------------


def _message_json(number: int, **overrides: Any) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"c{number}",
        "messageId": str(number),
        "data": base64.b64encode(f"m{number}".encode()).decode(),
        "attributes": {"n": str(number)},
        "orderingKey": "",
        "publishTime": "2025-01-01T00:00:00.123456Z",
    } | overrides


def test_a_coalesced_frame_is_split_into_messages() -> None:
    text = json.dumps({"type": "messages", "messages": [_message_json(1), _message_json(2)]})
    first, second = decode_frame(text)
    assert first == Message(
        "1", b"m1", {"n": "1"}, "c1", datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    )
    assert isinstance(second, Message) and second.id == "c2"
    assert decode_frame('{"type": "dropped", "count": 3}') == [Dropped(3)]
    assert decode_frame('{"type": "from-a-later-version"}') == []


@pytest.mark.parametrize("text", ["not json", "[]", '{"type": "message"}', '{"type": "dropped"}'])
def test_a_frame_that_is_not_loopgates_is_a_protocol_error(text: str) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(text)


def test_the_backoff_grows_with_full_jitter_and_is_capped() -> None:
    draws = iter([1.0] * 7 + [0.5, 0.0])
    backoff = Backoff(0.25, 2.0, rng=lambda: next(draws))
    assert [backoff.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert backoff.attempt == 6
    assert backoff.jitter() == 0.25 and backoff.attempt == 0  # a prompt reconnect resets it
    assert backoff.next() == 0.5 * 0.25  # full jitter: a uniform draw times the ceiling
    assert backoff.next() == 0.0
    for _ in range(2000):  # no overflow, however long it fails
        backoff.ceiling()
        backoff.attempt += 1
    assert backoff.ceiling() == 2.0
    with pytest.raises(ValueError):
        Backoff(1.0, 0.5)


def test_the_dedupe_window_drops_duplicates_and_is_bounded() -> None:
    dedupe = Dedupe(3)
    assert [dedupe.seen(i) for i in "abca"] == [False, False, False, True]
    assert [dedupe.seen(i) for i in "de"] == [False, False]  # "b" and "c" are forgotten
    assert len(dedupe) == 3
    assert dedupe.seen("a") is True  # seen again lately: kept
    assert dedupe.seen("b") is False
    assert not any(Dedupe(0).seen("x") for _ in range(3))


def test_retry_after_is_read_as_seconds_or_a_date() -> None:
    assert retry_after({"Retry-After": "7"}) == 7.0
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    assert 100 < (retry_after({"Retry-After": later}) or 0) <= 120
    assert retry_after({}) is None and retry_after({"Retry-After": "soon"}) is None


# -- the decoders on the real server's output (Quart's test client) ---------------------------


def _retained_topic(admin: PubSubAdmin) -> str:
    topic = f"r-{uuid.uuid4().hex[:12]}"
    admin.publisher.create_topic(
        request={
            "name": admin.publisher.topic_path(PROJECT, topic),
            "message_retention_duration": duration_pb2.Duration(seconds=3600),
        }
    )
    return topic


def _publish_direct(admin: PubSubAdmin, topic: str, count: int, prefix: str) -> list[str]:
    """Publish to the emulator itself, ``count`` messages in order (as when no loopgate is up)."""
    path = admin.publisher.topic_path(PROJECT, topic)
    return [
        admin.publisher.publish(path, f"{prefix}{i}".encode()).result(WAIT) for i in range(count)
    ]


async def test_the_decoders_read_the_servers_own_websocket_frames_and_events(
    pubsub_emulator: Any, admin: PubSubAdmin
) -> None:
    topic = admin.create_topic()
    app = create_app(make_settings())
    async with app.test_app():
        client = app.test_client()
        async with client.websocket(f"/v1/topics/{topic}/stream") as ws:
            [subscribed] = decode_frame(await asyncio.wait_for(ws.receive(), WAIT))
            assert isinstance(subscribed, Subscribed) and subscribed.topic == topic
            ids = _publish_direct(admin, topic, 3, "ws")
            got: list[Message | Subscribed | Dropped] = []
            async with asyncio.timeout(WAIT):
                while len(got) < 3:
                    got += decode_frame(await ws.receive())
        assert [m.message_id for m in got if isinstance(m, Message)] == ids
        assert [m.data for m in got if isinstance(m, Message)] == [b"ws0", b"ws1", b"ws2"]
        async with client.request(f"/v1/topics/{topic}/events") as sse:
            await sse.send_complete()
            parser, events = SSEParser(), []
            async with asyncio.timeout(WAIT):
                while not events:
                    events += parser.feed(await sse.receive())
                more = _publish_direct(admin, topic, 2, "sse")
                while len(events) < 3:
                    events += parser.feed(await sse.receive())
            await sse.disconnect()
    items = [item for event in events for item in decode_frame(event.data)]
    assert isinstance(items[0], Subscribed) and items[0].id == events[0].id
    assert [(m.message_id, m.id) for m in items[1:] if isinstance(m, Message)] == [
        (message_id, event.id) for message_id, event in zip(more, events[1:], strict=True)
    ]


# -- against real servers ---------------------------------------------------------------------


@dataclass
class Consumer:
    """Iterates a subscription in a task; records its messages and status notices."""

    subscription: Subscription
    messages: list[Message] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    task: asyncio.Task[None] | None = None
    done: bool = False

    def start(self) -> Consumer:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        try:
            async for message in self.subscription:
                async with self.changed:
                    self.messages.append(message)
                    self.changed.notify_all()
        finally:
            async with self.changed:  # a waiter sees the end (and the error) at once
                self.done = True
                self.changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(WAIT), self.changed:
            await self.changed.wait_for(lambda: predicate() or self.done)
        if self.done and self.task is not None:
            await self.task  # its error, if it failed
        assert predicate()

    def subscribed(self) -> list[Subscribed]:
        return [s for s in self.statuses if isinstance(s, Subscribed)]

    async def stop(self) -> None:
        await self.subscription.aclose()
        if self.task is not None:
            await asyncio.wait_for(self.task, WAIT)


def consume(url: str, topic: str, **options: Any) -> Consumer:
    """A started :class:`Consumer` of ``subscribe(url, topic, **options)``."""
    statuses: list[Status] = []
    changed = asyncio.Condition()

    async def on_status(status: Status) -> None:
        async with changed:
            statuses.append(status)
            changed.notify_all()

    subscription = subscribe(url, topic, on_status=on_status, **options)
    return Consumer(subscription, statuses=statuses, changed=changed).start()


async def _publish(
    http: aiohttp.ClientSession, url: str, topic: str, count: int, prefix: str
) -> list[str]:
    body = {
        "messages": [
            {
                "data": base64.b64encode(f"{prefix}{i}".encode()).decode(),
                "attributes": {"i": str(i)},
            }
            for i in range(count)
        ]
    }
    async with http.post(f"{url}/v1/topics/{topic}:publish", json=body) as response:
        assert response.status == 200, await response.text()
        return list((await response.json())["messageIds"])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_messages_arrive_as_message_objects(
    start_server: Any, server_name: str, admin: PubSubAdmin, transport: str
) -> None:
    server = await start_server(server=server_name)
    topic = admin.create_topic()
    consumer = consume(server.url, topic, transport=transport)
    try:
        await consumer.wait_for(lambda: bool(consumer.subscribed()))
        async with aiohttp.ClientSession() as http:
            ids = await _publish(http, server.url, topic, 20, "m")
        await consumer.wait_for(lambda: len(consumer.messages) >= 20)
    finally:
        await consumer.stop()
    assert [m.message_id for m in consumer.messages] == ids
    assert [m.data for m in consumer.messages] == [f"m{i}".encode() for i in range(20)]
    assert consumer.messages[3].attributes == {"i": "3"}
    assert all(m.publish_time.tzinfo is not None and m.id for m in consumer.messages)
    assert consumer.subscription.last_event_id == consumer.messages[-1].id
    assert consumer.subscription.closed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_restart_is_resumed_and_every_message_arrives_exactly_once(
    tmp_path: Path, pubsub_emulator: Any, admin: PubSubAdmin, transport: str
) -> None:
    topic = _retained_topic(admin)
    servers: list[Server] = [spawn_server(tmp_path)]
    consumer: Consumer | None = None
    try:
        old = servers[0]
        await wait_until_up(old)
        consumer = consume(old.url, topic, transport=transport, initial_delay=0.05, max_delay=0.5)
        await consumer.wait_for(lambda: bool(consumer.subscribed()))
        async with aiohttp.ClientSession() as http:
            published = await _publish(http, old.url, topic, 5, "before")
            await consumer.wait_for(lambda: len(consumer.messages) >= 5)
            await asyncio.to_thread(old.stop)  # SIGTERM: websockets closed with 1001
            published += _publish_direct(admin, topic, 5, "while-down")
            servers.append(spawn_server(tmp_path, port=old.port))  # the same URL
            await wait_until_up(servers[1])
            await consumer.wait_for(lambda: len(consumer.subscribed()) >= 2)
            published += await _publish(http, old.url, topic, 5, "after")
            await consumer.wait_for(lambda: len(consumer.messages) >= len(published))
    finally:
        if consumer is not None:
            await consumer.stop()
        for server in servers:
            await asyncio.to_thread(server.stop)
    assert [m.message_id for m in consumer.messages] == published  # once each, in order
    first, second = consumer.subscribed()[:2]
    assert (first.resumed, second.resumed, second.complete) == (False, True, True)
    assert second.id == consumer.messages[4].id  # resumed after the last message handed out
    assert any(isinstance(s, Reconnecting) for s in consumer.statuses)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refusals_raise_clear_errors(
    start_server: Any, tmp_path: Path, admin: PubSubAdmin, transport: str
) -> None:
    topic = admin.create_topic()
    reader, other, everything = new_token(), new_token(), new_token()
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {
            "reader": (reader, [f"subscribe:{topic}"]),
            "other": (other, ["subscribe:nothing"]),
            "everything": (everything, ["subscribe:*"]),
        },
    )
    server = await start_server(
        {"LOOPGATE_AUTH": "enabled", "LOOPGATE_AUTH_FILE": str(tokens), "LOOPGATE_TOPICS": topic}
    )
    cases: list[tuple[dict[str, Any], type[SubscribeError], int]] = [
        ({}, Unauthorized, 401),
        ({"token": "not-a-token"}, Unauthorized, 401),
        ({"token": other}, Forbidden, 403),
        ({"token": reader, "last_event_id": "not-a-cursor"}, BadRequest, 400),
        ({"token": lambda: reader, "last_event_id": "not-a-cursor"}, BadRequest, 400),
    ]
    for options, error, status in cases:
        subscription = subscribe(server.url, topic, transport=transport, **options)
        with pytest.raises(error) as raised:
            async with asyncio.timeout(WAIT), subscription:
                await anext(subscription)
        assert raised.value.status == status and raised.value.message
        assert subscription.closed
    if transport == "sse":  # the server's own JSON message (aiohttp drops a websocket's body)
        assert "cursor" in raised.value.message
    not_served = subscribe(server.url, "not-served", token=everything, transport=transport)
    with pytest.raises(NotFound) as raised:
        async with asyncio.timeout(WAIT), not_served:
            await anext(not_served)
    assert raised.value.status == 404


# -- against a tiny fake server (codes and statuses a real server does not give on demand) -----


@dataclass
class Reply:
    """How the fake answers one connection: an HTTP status with a JSON error, or the stream's
    frames followed by a close code (``None``: stay open)."""

    status: int = 0  # 0: accept
    headers: dict[str, str] = field(default_factory=dict)
    frames: list[dict[str, Any]] = field(default_factory=list)
    close: int | None = None
    reason: str = ""


class FakeLoopgate:
    """An aiohttp server that answers each stream connection with the next :class:`Reply` (and
    stays open, sending nothing, once they are used up), recording each request's cursor."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.cursors: list[str | None] = []
        app = web.Application()
        app.router.add_get("/v1/topics/{topic}/stream", self._websocket)
        app.router.add_get("/v1/topics/{topic}/events", self._events)
        self.server = TestServer(app)
        self.release = asyncio.Event()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def _next(self, request: web.Request, cursor: str | None) -> tuple[Reply, dict[str, Any]]:
        self.cursors.append(cursor)
        reply = self.replies.pop(0) if self.replies else Reply()
        subscribed = {"type": "subscribed", "topic": request.match_info["topic"]}
        subscribed |= {"id": cursor or "start", "resumed": bool(cursor), "complete": True}
        return reply, subscribed

    def _refusal(self, reply: Reply) -> web.Response:
        body = {"error": {"code": reply.status, "message": reply.reason or "refused"}}
        return web.json_response(body, status=reply.status, headers=reply.headers)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        reply, subscribed = self._next(request, request.query.get("lastEventId"))
        if reply.status:
            return self._refusal(reply)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for frame in [subscribed, *reply.frames]:
            await ws.send_str(json.dumps(frame))
        if reply.close is None:
            async for _ in ws:  # until the client closes (its close frame is answered)
                pass
        else:
            await ws.close(code=reply.close, message=reply.reason.encode())
        return ws

    async def _events(self, request: web.Request) -> web.StreamResponse:
        reply, subscribed = self._next(request, request.headers.get("Last-Event-ID"))
        if reply.status:
            return self._refusal(reply)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in [subscribed, *reply.frames]:
            event_id = f"id: {frame['id']}\r\n" if "id" in frame else ""
            await response.write(
                f": heartbeat\r\n{event_id}data: {json.dumps(frame)}\r\n\r\n".encode()
            )
        if reply.close is None:
            await self.release.wait()
        return response

    async def __aenter__(self) -> FakeLoopgate:
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        await self.server.close()


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[list[Reply]], Any]]:
    started: list[FakeLoopgate] = []

    async def start(replies: list[Reply]) -> FakeLoopgate:
        server = FakeLoopgate(replies)
        started.append(server)
        return await server.__aenter__()

    yield start
    for server in started:
        await server.__aexit__()


class Sleeps:
    """An injected sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_coalesced_frames_are_split_and_duplicates_dropped_across_a_reconnect(
    fake: Any, transport: str
) -> None:
    server = await fake(
        [
            Reply(
                frames=[
                    {"type": "messages", "messages": [_message_json(1), _message_json(2)]},
                    _message_json(2),  # Pub/Sub delivered it twice
                    {"type": "dropped", "count": 4},
                    _message_json(3),
                ],
                close=1001,
            ),
            Reply(frames=[{"type": "messages", "messages": [_message_json(3), _message_json(4)]}]),
        ]
    )
    sleeps = Sleeps()
    consumer = consume(server.url, "t", transport=transport, sleep=sleeps, rng=lambda: 0.5)
    try:
        await consumer.wait_for(lambda: len(consumer.messages) >= 4)
    finally:
        await consumer.stop()
    assert [m.message_id for m in consumer.messages] == ["1", "2", "3", "4"]
    assert server.cursors == [None, "c3"]  # resumed after the last message handed out
    assert Dropped(4) in consumer.statuses
    assert sleeps.delays == [0.125]  # the SSE stream's end after messages is a prompt reconnect


async def test_the_dedupe_window_is_bounded(fake: Any) -> None:
    frames = [_message_json(n) for n in (1, 2, 3, 1, 3)]
    server = await fake([Reply(frames=frames)])
    consumer = consume(server.url, "t", dedupe_window=2)
    try:
        await consumer.wait_for(lambda: len(consumer.messages) >= 4)
    finally:
        await consumer.stop()
    assert [m.message_id for m in consumer.messages] == ["1", "2", "3", "1"]  # 1 was forgotten


async def test_close_codes_decide_how_soon_it_reconnects(fake: Any) -> None:
    server = await fake(
        [
            Reply(frames=[_message_json(1)], close=1013, reason="try again later"),
            Reply(close=1013),
            Reply(close=1011),
            Reply(close=1013),
            Reply(frames=[_message_json(2)], close=1001),
            Reply(close=1000),
            Reply(frames=[_message_json(3)], close=1008, reason="token expired"),
        ]
    )
    sleeps = Sleeps()
    consumer = consume(server.url, "t", sleep=sleeps, rng=lambda: 1.0, initial_delay=1, max_delay=4)
    with pytest.raises(PolicyViolation) as raised:
        await consumer.wait_for(lambda: False)
    assert raised.value.code == 1008 and "token expired" in str(raised.value)
    assert sleeps.delays == [1, 2, 4, 4, 1, 1]  # 1013/1011 back off (capped); 1001, 1000 do not
    reasons = [s.reason for s in consumer.statuses if isinstance(s, Reconnecting)]
    assert reasons[0] == "closed with 1013 try again later"
    assert server.cursors == [None, "c1", "c1", "c1", "c1", "c2", "c2"]
    assert [m.message_id for m in consumer.messages] == ["1", "2", "3"]
    assert consumer.subscription.closed


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_429_503_and_5xx_are_retried_no_sooner_than_retry_after(
    fake: Any, transport: str
) -> None:
    server = await fake(
        [
            Reply(status=503, headers={"Retry-After": "7"}),
            Reply(status=429, headers={"Retry-After": "3"}),
            Reply(status=502),
            Reply(frames=[_message_json(1)]),
        ]
    )
    sleeps = Sleeps()
    consumer = consume(
        server.url, "t", transport=transport, sleep=sleeps, rng=lambda: 1.0, last_event_id="c0"
    )
    try:
        await consumer.wait_for(lambda: len(consumer.messages) >= 1)
    finally:
        await consumer.stop()
    assert sleeps.delays == [7, 3, 1.0]  # the backoff's own 0.25, 0.5, then 1.0
    assert server.cursors == ["c0"] * 4


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 418])
async def test_other_4xx_are_not_retried(fake: Any, transport: str, status: int) -> None:
    server = await fake([Reply(status=status, reason="the server's reason")])
    consumer = consume(server.url, "t", transport=transport, sleep=Sleeps())
    with pytest.raises(SubscribeError) as raised:
        await consumer.wait_for(lambda: False)
    assert raised.value.status == status and server.cursors == [None]
    if transport == "sse":
        assert raised.value.message == "the server's reason"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_aclose_from_another_task_ends_the_iteration(fake: Any, transport: str) -> None:
    server = await fake([])
    consumer = consume(server.url, "t", transport=transport)
    await consumer.wait_for(lambda: bool(consumer.subscribed()))
    await consumer.stop()  # the consumer's task ends without an error
    assert consumer.messages == [] and consumer.subscription.closed
