"""Request bodies, in process (apps called through their ASGI callable): a body that the app
refuses before reading it is still read to its end before the response ends (a lingering
close), and a small one is read before its handler runs, in the connection's own task."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import WAIT, Topic, http_scope
from quart import Quart, request

from service.server.quart_connections import HTTPConnection
from service.server.request_body import SCOPE_KEY as STREAM_KEY
from service.server.request_body import SMALL_BODY_BYTES, ReceivedBody, body_size

MIB = 1024 * 1024


class Client:
    """The client side of one ASGI request: a body fed piece by piece, and what was sent back."""

    def __init__(self) -> None:
        self.pieces: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: list[dict[str, Any]] = []
        self.answered = asyncio.Event()  # the response's body has come
        self.ended = asyncio.Event()  # the response has ended

    async def receive(self) -> dict[str, Any]:
        return await self.pieces.get()

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body":
            if message.get("body"):
                self.answered.set()
            if not message.get("more_body", False):
                self.ended.set()

    def send_body(self, pieces: int, *, last: bool) -> None:
        for index in range(pieces):
            more = not (last and index == pieces - 1)
            self.pieces.put_nowait({"type": "http.request", "body": b"x" * MIB, "more_body": more})


def publish_scope(topic: str, length: int) -> dict[str, Any]:
    scope = http_scope(f"/v1/topics/{topic}:publish", "POST")
    scope["headers"] += [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % length),
    ]
    return scope


@contextlib.asynccontextmanager
async def refused_publish(
    app: Quart, topic: Topic
) -> AsyncIterator[tuple[Client, asyncio.Future[None]]]:
    """A publish declaring 12 MiB, over the limit, with its first MiB sent and its 413 come."""
    client = Client()
    client.send_body(1, last=False)
    call = asyncio.ensure_future(
        app.asgi_app(publish_scope(topic.name, 12 * MIB), client.receive, client.send)  # type: ignore[arg-type]
    )
    try:
        await asyncio.wait_for(client.answered.wait(), WAIT)
        assert client.sent[0]["status"] == 413
        yield client, call
    finally:
        call.cancel()


async def test_a_refused_publish_body_is_read_to_its_end_before_the_response_ends(
    app: Quart, topic: Topic
) -> None:
    async with refused_publish(app, topic) as (client, call):
        assert not client.ended.is_set()  # the rest of the body is still to come
        client.send_body(11, last=True)
        await asyncio.wait_for(client.ended.wait(), WAIT)
        assert client.pieces.empty()  # all of it was read before the end
        await asyncio.wait_for(call, WAIT)


async def test_a_client_that_goes_away_ends_the_lingering_response(
    app: Quart, topic: Topic
) -> None:
    async with refused_publish(app, topic) as (client, call):
        client.pieces.put_nowait({"type": "http.disconnect"})
        await asyncio.wait_for(call, WAIT)  # no further send: nothing reaches a client gone


@pytest.mark.parametrize(
    ("headers", "large"),
    [
        ([(b"content-length", b"%d" % SMALL_BODY_BYTES)], False),
        ([(b"content-length", b"%d" % (SMALL_BODY_BYTES + 1))], True),
        ([(b"Content-Length", b"%d, %d" % (MIB, MIB))], True),
        ([(b"transfer-encoding", b"chunked")], True),
        ([(b"content-type", b"application/json")], False),
    ],
)
def test_which_bodies_get_a_lingering_close(
    headers: list[tuple[bytes, bytes]], large: bool
) -> None:
    assert (body_size({"headers": [(b"host", b"x"), *headers]}) == "large") is large


async def test_the_end_of_the_body_is_noted_whoever_reads_it() -> None:
    pieces = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": False},
    ]

    async def receive() -> Any:
        return pieces.pop(0)

    body = ReceivedBody(receive)
    waiting = asyncio.ensure_future(body.discard_rest())
    assert (await body.receive())["body"] == b"a"
    assert not body.complete and not waiting.done()
    assert (await body.receive())["body"] == b"b"
    await asyncio.wait_for(waiting, WAIT)
    assert body.complete and not body.disconnected


# -- small bodies: read first, their handler run in the connection's own task ----------------


def inline_app(body_timeout: float | None = None) -> tuple[Quart, list[asyncio.Task[Any] | None]]:
    """A Quart app with loopgate's HTTP connection, whose route records the task it ran in."""
    app = Quart(__name__)
    app.asgi_http_class = HTTPConnection
    app.config["BODY_TIMEOUT"] = body_timeout
    tasks: list[asyncio.Task[Any] | None] = []

    @app.route("/echo", methods=["GET", "POST"])
    async def echo() -> bytes:
        tasks.append(asyncio.current_task())
        return await request.get_data()

    return app, tasks


def echo_scope(method: str, body: bytes, **extra: Any) -> dict[str, Any]:
    scope = http_scope("/echo", method)
    scope["headers"] += [(b"content-length", b"%d" % len(body))]
    scope.update(extra)
    return scope


async def call(app: Quart, scope: dict[str, Any], client: Client) -> None:
    async with asyncio.timeout(WAIT):  # not wait_for: before Python 3.12 it runs a task
        await app(scope, client.receive, client.send)  # type: ignore[arg-type]


async def test_a_small_body_is_read_first_and_its_handler_runs_in_the_connections_task() -> None:
    app, tasks = inline_app()
    client = Client()
    client.pieces.put_nowait({"type": "http.request", "body": b"hel", "more_body": True})
    client.pieces.put_nowait({"type": "http.request", "body": b"lo", "more_body": False})
    await call(app, echo_scope("POST", b"hello"), client)
    assert client.sent[0]["status"] == 200
    assert b"".join(m.get("body", b"") for m in client.sent[1:]) == b"hello"
    assert tasks == [asyncio.current_task()]


@pytest.mark.parametrize(
    ("method", "size", "extra"),
    [
        ("POST", SMALL_BODY_BYTES + 1, {}),  # too large to wait for
        ("GET", 0, {}),  # no body: the receiver watches for the client going away
        ("POST", 5, {STREAM_KEY: object()}),  # a body its handler streams
    ],
)
async def test_other_requests_are_served_by_tasks_of_their_own(
    method: str, size: int, extra: dict[str, Any]
) -> None:
    app, tasks = inline_app()
    client = Client()
    body = b"x" * size
    client.pieces.put_nowait({"type": "http.request", "body": body, "more_body": False})
    await call(app, echo_scope(method, body, **extra), client)
    assert client.sent[0]["status"] == 200
    assert len(tasks) == 1 and tasks[0] is not asyncio.current_task()


async def test_a_small_body_that_does_not_come_is_answered_408() -> None:
    app, tasks = inline_app(body_timeout=0.2)
    client = Client()  # that sends nothing
    await call(app, echo_scope("POST", b"hello"), client)
    assert client.sent[0]["status"] == 408
    assert len(tasks) == 1  # the handler ran, and its read of the body timed out at once


async def test_a_client_gone_before_its_small_body_came_gets_nothing() -> None:
    app, tasks = inline_app()
    client = Client()
    client.pieces.put_nowait({"type": "http.disconnect"})
    await call(app, echo_scope("POST", b"hello"), client)
    assert client.sent == [] and tasks == []
