"""A storage backend that stops answering: a download's head must come within
``LOOPGATE_STORAGE_TIMEOUT`` (503 otherwise), and a body that stops coming for that long is ended
and its connection let go. The emulator cannot stall, so a fake backend on loopback does: it reads
a request and answers nothing, or sends a media response's head and part of its body, then
nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from conftest import WAIT, Server, http_scope, make_settings, metric_value
from quart import Quart

from service import create_app

BUCKET = "stalls"
SIZE = 1024 * 1024
SENT = 64 * 1024  # the part of the body sent before the backend stalls
TIMEOUT = 0.5
HEAD = (
    "HTTP/1.1 200 OK\r\n"
    f"Content-Length: {SIZE}\r\n"
    "Content-Type: application/octet-stream\r\n"
    'ETag: "stalled-etag"\r\n'
    "X-Goog-Generation: 7\r\n"
    "\r\n"
).encode()


class StallingBackend:
    """A loopback server that reads each request's head, then answers nothing (``head``) or a
    head and ``SENT`` bytes of the body (``body``), and keeps the connection open."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.closed = asyncio.Event()  # a connection closed by its client (loopgate)
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> StallingBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # a connection closed before its request
                return
            self.requests += 1
            if self.mode == "body":
                writer.write(HEAD + b"s" * SENT)
                await writer.drain()
            await reader.read()  # nothing more: until the client closes the connection
            self.closed.set()
        finally:
            writer.close()


@pytest.fixture
async def stalling_app(
    pubsub_emulator: Any, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Quart, StallingBackend]]:
    async with StallingBackend(request.param) as backend:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", backend.url)
        app = create_app(make_settings(buckets=BUCKET, storage_timeout=TIMEOUT))
        async with app.test_app():
            yield app, backend


@pytest.mark.parametrize("stalling_app", ["head"], indirect=True)
async def test_a_download_whose_head_does_not_come_answers_503(
    stalling_app: tuple[Quart, StallingBackend],
) -> None:
    app, backend = stalling_app
    started = time.monotonic()
    response = await app.test_client().get(f"/v1/buckets/{BUCKET}/objects/late")
    assert time.monotonic() - started >= TIMEOUT
    body = await response.get_json()
    assert response.status_code == 503, body
    assert int(response.headers["Retry-After"]) >= 1
    assert body["error"]["status"] == "UNAVAILABLE"
    assert f"no answer within {TIMEOUT:g} s" in body["error"]["message"]
    assert backend.requests == 1
    await asyncio.wait_for(backend.closed.wait(), WAIT)  # the connection was let go


@pytest.mark.parametrize("stalling_app", ["body"], indirect=True)
async def test_a_download_whose_body_stops_coming_is_ended(
    stalling_app: tuple[Quart, StallingBackend], caplog: pytest.LogCaptureFixture
) -> None:
    app, backend = stalling_app
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    requested = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not requested.is_set():
            requested.set()
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays: only the backend is stalled
        raise AssertionError("unreachable")

    scope = http_scope(f"/v1/buckets/{BUCKET}/objects/stalled")
    started = time.monotonic()
    with pytest.raises(aiohttp.ClientConnectionError):  # the response cannot be finished
        await asyncio.wait_for(app(scope, receive, send), WAIT)
    assert time.monotonic() - started >= TIMEOUT
    assert messages[0]["type"] == "http.response.start" and messages[0]["status"] == 200
    received = sum(len(m.get("body", b"")) for m in messages[1:])
    assert received == SENT
    assert not any(m["type"] == "http.response.body" and not m["more_body"] for m in messages)
    assert "the backend sent nothing for 0.5 s" in caplog.text
    await asyncio.wait_for(backend.closed.wait(), WAIT)
    text = await (await app.test_client().get("/metrics")).get_data(as_text=True)
    assert metric_value(text, "loopgate_storage_transfers", direction="down") == 0


@pytest.mark.parametrize("mode", ["head", "body"])
async def test_server_a_stalled_backend_ends_the_download(
    start_server: Callable[..., Awaitable[Server]], mode: str
) -> None:
    async with StallingBackend(mode) as backend:
        env = {
            "STORAGE_EMULATOR_HOST": backend.url,
            "LOOPGATE_BUCKETS": BUCKET,
            "LOOPGATE_STORAGE_TIMEOUT": str(TIMEOUT),
        }
        server = await start_server(env=env, workers=1)
        target = f"{server.url}/v1/buckets/{BUCKET}/objects/stalled"
        timeout = aiohttp.ClientTimeout(total=WAIT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.get(target) as response:
                if mode == "head":
                    body = await response.json()
                    assert response.status == 503, body
                    assert f"no answer within {TIMEOUT:g} s" in body["error"]["message"]
                else:
                    assert response.status == 200
                    assert response.headers["Content-Length"] == str(SIZE)
                    received = 0
                    with pytest.raises(aiohttp.ClientPayloadError):  # the body ends short
                        async for chunk in response.content.iter_any():
                            received += len(chunk)
                    assert received == SENT
            await asyncio.wait_for(backend.closed.wait(), WAIT)
            # The worker serves on.
            async with http.get(f"{server.url}/healthz") as response:
                assert response.status == 200
        if mode == "body":
            assert "the backend sent nothing for 0.5 s" in server.log()
