"""Per-token limits: publish requests and bytes per second, open streams per token."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from authkit import bearer, new_token, write_tokens
from conftest import WAIT, Topic, http_scope, make_settings
from quart import Quart
from quart.testing.connections import WebsocketResponseError
from wsapp import add_test_stream_route

from service import create_app
from service.auth.limits import TokenBucket

BODY = {"messages": [{"data": base64.b64encode(b"x" * 30).decode()}]}
FAST, SLOW, OTHER = new_token(), new_token(), new_token()


def tokens(tmp_path: Path) -> str:
    path = write_tokens(
        tmp_path / "tokens.toml",
        {"fast": (FAST, ["*"]), "slow": (SLOW, ["*"]), "other": (OTHER, ["*"])},
        slow={"publish_rate": 0.001, "max_connections": 1},
    )
    return str(path)


def test_token_bucket_refills_at_its_rate_and_lets_a_large_cost_through_when_full() -> None:
    bucket = TokenBucket(rate=2.0, capacity=4.0, stamp=100.0)
    assert bucket.wait_time(4, now=100.0) == 0
    bucket.take(4)
    assert bucket.wait_time(1, now=100.0) == pytest.approx(0.5)
    assert bucket.wait_time(1, now=100.5) == 0
    bucket.take(1)
    # Larger than the capacity: waits for a full bucket, then goes through and leaves a debt.
    assert bucket.wait_time(10, now=100.5) == pytest.approx(2.0)
    assert bucket.wait_time(10, now=102.5) == 0
    bucket.take(10)
    assert bucket.wait_time(1, now=102.5) == pytest.approx(3.5)


@pytest.fixture
async def limited_app(pubsub_emulator: Any, tmp_path: Path) -> AsyncIterator[Quart]:
    settings = make_settings(
        auth="enabled",
        auth_file=tokens(tmp_path),
        publish_rate=0.01,
        publish_burst=2,
        max_connections_per_token=2,
    )
    app = add_test_stream_route(create_app(settings))
    async with app.test_app():
        yield app


async def test_publish_requests_over_the_rate_get_429_with_retry_after(
    limited_app: Quart, topic: Topic
) -> None:
    client = limited_app.test_client()
    url = f"/v1/topics/{topic.name}:publish"
    statuses = [
        (await client.post(url, json=BODY, headers=bearer(FAST))).status_code for _ in range(2)
    ]
    assert statuses == [200, 200]
    refused = await client.post(url, json=BODY, headers=bearer(FAST))
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 50
    assert (await refused.get_json())["error"]["status"] == "RESOURCE_EXHAUSTED"
    # Another token has its own buckets; a token's own rate overrides the default.
    assert (await client.post(url, json=BODY, headers=bearer(OTHER))).status_code == 200
    assert (await client.post(url, json=BODY, headers=bearer(SLOW))).status_code == 200
    slow = await client.post(url, json=BODY, headers=bearer(SLOW))
    assert slow.status_code == 429
    assert int(slow.headers["Retry-After"]) >= 500
    assert len(topic.received(4)) == 4


async def test_publish_bytes_over_the_rate_get_429(pubsub_emulator: Any, tmp_path: Path) -> None:
    settings = make_settings(
        auth="enabled", auth_file=tokens(tmp_path), publish_byte_rate=0.01, publish_byte_burst=100
    )
    async with (app := create_app(settings)).test_app():
        client = app.test_client()
        first = await client.post(
            "/v1/topics/nowhere-topic:publish", json=BODY, headers=bearer(FAST)
        )
        assert first.status_code == 404  # charged, then refused for the topic
        second = await client.post(
            "/v1/topics/nowhere-topic:publish", json=BODY, headers=bearer(FAST)
        )
        assert second.status_code == 429
        assert "bytes" in (await second.get_json())["error"]["message"]


async def test_a_body_over_the_size_limit_is_413_and_charges_nothing(
    pubsub_emulator: Any, tmp_path: Path, topic: Topic
) -> None:
    # A byte budget that the oversized body's declared length would empty: it must be refused
    # as too large (a 429 would invite a retry that fails again), and charge nothing, so that
    # the next small publish still goes through. Called as a server calls the app.
    settings = make_settings(
        auth="enabled",
        auth_file=tokens(tmp_path),
        max_body_bytes=1024,
        publish_byte_rate=0.01,
        publish_byte_burst=1500,
    )
    async with (app := create_app(settings)).test_app():
        sent: list[dict[str, Any]] = []
        answered = asyncio.Event()
        pieces = [{"type": "http.request", "body": b"x" * 4000, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pieces:
                return pieces.pop()
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()

        scope = http_scope(f"/v1/topics/{topic.name}:publish", "POST")
        scope["headers"] += [
            (b"authorization", f"Bearer {FAST}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"4000"),
        ]
        await asyncio.wait_for(app(scope, receive, send), WAIT)  # type: ignore[arg-type]
        assert answered.is_set()
        assert sent[0]["status"] == 413
        accepted = await app.test_client().post(
            f"/v1/topics/{topic.name}:publish", json=BODY, headers=bearer(FAST)
        )
        assert accepted.status_code == 200, await accepted.get_data()


async def test_no_per_token_limits_without_authentication(pubsub_emulator: Any) -> None:
    settings = make_settings(publish_rate=0.01, publish_burst=1)
    async with (app := create_app(settings)).test_app():
        client = app.test_client()
        for _ in range(3):
            response = await client.post("/v1/topics/nowhere-topic:publish", json=BODY)
            assert response.status_code == 404


async def test_streams_per_token_are_bounded_at_the_handshake(limited_app: Quart) -> None:
    client = limited_app.test_client()
    path = f"/test/orders/ws?access_token={SLOW}"  # SLOW may hold one stream
    async with client.websocket(path) as first:
        assert "slow" in await asyncio.wait_for(first.receive(), WAIT)
        with pytest.raises(WebsocketResponseError) as refused:
            async with client.websocket(path) as second:
                await asyncio.wait_for(second.receive(), WAIT)
        assert refused.value.response.status_code == 429
        async with client.websocket(f"/test/orders/ws?access_token={OTHER}") as other:
            assert "other" in await asyncio.wait_for(other.receive(), WAIT)
    # The slot is given back when the stream ends.
    async with asyncio.timeout(WAIT):
        while True:
            try:
                async with client.websocket(path) as again:
                    assert "slow" in await asyncio.wait_for(again.receive(), WAIT)
                    break
            except WebsocketResponseError as exc:
                assert exc.response.status_code == 429
                await asyncio.sleep(0.05)


async def test_real_server_limits_publish_rate_and_streams(
    start_server: Any, tmp_path: Path, topic: Topic, server_name: str
) -> None:
    server = await start_server(
        {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": tokens(tmp_path),
            "LOOPGATE_PUBLISH_RATE": "0.01",
            "LOOPGATE_PUBLISH_BURST": "3",
        },
        app="tests.wsapp:create_app()",
        server=server_name,
    )
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(5):
            async with session.post(url, json=BODY, headers=bearer(FAST)) as response:
                statuses.append(response.status)
                if response.status == 429:
                    assert int(response.headers["Retry-After"]) >= 50
        assert statuses == [200, 200, 200, 429, 429]

        ws_url = f"{server.url}/test/orders/ws?access_token={SLOW}"
        first = await session.ws_connect(ws_url)
        assert "slow" in (await first.receive(timeout=WAIT)).data
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url)
        assert refused.value.status == 429
        await first.close()

        # Each server's flags bound the request head (see SECURITY.md for what that means).
        huge = {"X-Padding": "x" * 100_000, **bearer(OTHER)}
        status: int | None
        try:
            async with session.post(url, json=BODY, headers=huge) as response:
                status = response.status
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # The server answers 431 and closes at once, before reading the rest of the head:
            # the client, still sending it, may see the close (or a reset) before the answer.
            status = None
        assert status in (431, None)
    assert len(topic.received(3)) == 3
