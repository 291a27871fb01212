"""Object reads against the storage emulator: how many backend requests each kind of read makes,
the fallback when the media response says too little, the transferred-bytes count, and the end of
a download whose client takes nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import WAIT, http_scope, make_settings, metric_value
from quart import Quart
from quart.typing import TestClientProtocol as Client

from devtools.emulators import StorageEmulator
from service import create_app
from service.clients.storage.client import StorageClient
from service.config import Settings
from service.routes import storage_download


@pytest.fixture
def settings(storage_emulator: StorageEmulator, bucket: str) -> Settings:
    return make_settings(buckets=bucket)


@pytest.fixture
def metadata_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names whose metadata the service fetched."""
    calls: list[str] = []
    original = StorageClient.metadata

    async def counted(self: StorageClient, bucket: str, name: str) -> dict[str, Any]:
        calls.append(name)
        return await original(self, bucket, name)

    monkeypatch.setattr(StorageClient, "metadata", counted)
    return calls


def path(bucket: str, name: str) -> str:
    return f"/v1/buckets/{bucket}/objects/{name}"


async def test_plain_read_is_one_backend_request(
    client: Client, bucket: str, metadata_calls: list[str]
) -> None:
    response = await client.put(
        path(bucket, "one"), data=b"0123456789", headers={"Content-Type": "text/x-digits"}
    )
    meta = await response.get_json()
    response = await client.get(path(bucket, "one"))
    assert response.status_code == 200
    assert await response.get_data() == b"0123456789"
    assert response.headers["Content-Length"] == "10"
    assert response.headers["Content-Type"] == "text/x-digits"
    assert response.headers["ETag"] == f'"{meta["etag"]}"'
    assert metadata_calls == []
    # The ETag of a plain read is the one conditional reads compare with.
    response = await client.get(
        path(bucket, "one"), headers={"If-None-Match": response.headers["ETag"]}
    )
    assert response.status_code == 304
    assert metadata_calls == ["one"]
    response = await client.get(path(bucket, "one"), headers={"Range": "bytes=2-4"})
    assert (response.status_code, await response.get_data()) == (206, b"234")
    response = await client.head(path(bucket, "one"))
    assert (response.status_code, response.headers["ETag"]) == (200, f'"{meta["etag"]}"')
    assert metadata_calls == ["one", "one", "one"]


async def test_plain_read_of_an_empty_and_a_missing_object(
    client: Client, bucket: str, metadata_calls: list[str]
) -> None:
    assert (await client.put(path(bucket, "empty"), data=b"")).status_code == 201
    response = await client.get(path(bucket, "empty"))
    assert (response.status_code, await response.get_data()) == (200, b"")
    assert response.headers["Content-Length"] == "0"
    response = await client.get(path(bucket, "absent"))
    assert response.status_code == 404
    assert (await response.get_json())["error"]["status"] == "NOT_FOUND"
    assert metadata_calls == []


async def test_media_response_saying_too_little_falls_back_to_metadata(
    client: Client, bucket: str, metadata_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fake: the emulator's media response always carries length and hash.
    monkeypatch.setattr(storage_download, "media_info", lambda headers: None)
    meta = await (await client.put(path(bucket, "fb"), data=b"fallback")).get_json()
    response = await client.get(path(bucket, "fb"))
    assert (response.status_code, await response.get_data()) == (200, b"fallback")
    assert response.headers["ETag"] == f'"{meta["etag"]}"'
    assert response.headers["X-Goog-Generation"] == str(meta["generation"])
    assert response.headers["Content-Length"] == "8"
    assert metadata_calls == ["fb"]


async def test_transferred_bytes_are_all_counted(client: Client, bucket: str) -> None:
    async def counted(direction: str) -> float:
        text = await (await client.get("/metrics")).get_data(as_text=True)
        return metric_value(text, "loopgate_storage_bytes_total", direction=direction)

    size = storage_download.COUNT_BYTES + 12345  # one step of the count and a remainder
    up, down = await counted("up"), await counted("down")
    assert (await client.put(path(bucket, "counted"), data=b"c" * size)).status_code == 201
    assert len(await (await client.get(path(bucket, "counted"))).get_data()) == size
    assert await counted("up") == up + size
    assert await counted("down") == down + size


async def _serve_to_a_client_taking_nothing(app: Quart, target: str, stuck: asyncio.Event) -> None:
    """Serve a GET of ``target`` to a client that takes the response head and then never
    finishes taking the first body chunk (its send blocks, as Hypercorn's does on a full socket),
    without disconnecting; ``stuck`` is set when that send begins. Returns once the app has
    ended the response."""

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            stuck.set()
            await asyncio.Event().wait()

    await asyncio.wait_for(app(http_scope(target), staying_client(), send), WAIT)


def staying_client() -> Callable[[], Awaitable[dict[str, Any]]]:
    """The ASGI ``receive`` of a GET whose client stays connected until the response ends."""
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # no disconnect: the client stays
        raise AssertionError("unreachable")

    return receive


@pytest.fixture
async def idle_app(pubsub_emulator: Any, bucket: str) -> AsyncIterator[Quart]:
    app = create_app(make_settings(buckets=bucket, download_idle_timeout=0.3))
    async with app.test_app():
        yield app


async def _transfers_down(app: Quart) -> float:
    text = await (await app.test_client().get("/metrics")).get_data(as_text=True)
    return metric_value(text, "loopgate_storage_transfers", direction="down")


async def _put(app: Quart, target: str) -> None:
    size = 4 * storage_download.READ_BYTES
    assert (await app.test_client().put(target, data=b"t" * size)).status_code == 201


async def test_a_download_whose_client_takes_nothing_is_ended(idle_app: Quart, bucket: str) -> None:
    target = path(bucket, "untaken")
    await _put(idle_app, target)
    stuck = asyncio.Event()
    await _serve_to_a_client_taking_nothing(idle_app, target, stuck)
    assert stuck.is_set()
    assert await _transfers_down(idle_app) == 0


@pytest.fixture
async def patient_app(pubsub_emulator: Any, bucket: str) -> AsyncIterator[Quart]:
    app = create_app(make_settings(buckets=bucket, download_idle_timeout=1.0))
    async with app.test_app():
        yield app


async def test_a_slow_client_that_keeps_taking_chunks_gets_the_whole_object(
    patient_app: Quart, bucket: str
) -> None:
    """The idle timeout bounds the send of each chunk, not the whole download: a client taking
    each chunk in 0.3 s gets all of them, though together they take longer than the timeout."""
    target = path(bucket, "slowly")
    await _put(patient_app, target)
    received: list[bytes] = []
    ended = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if message.get("body"):
                await asyncio.sleep(0.3)  # the client's pace, not a wait for the server
                received.append(message["body"])
            if not message.get("more_body", False):
                ended.set()

    await asyncio.wait_for(patient_app(http_scope(target), staying_client(), send), WAIT)
    assert ended.is_set()
    assert len(received) >= 4  # at least 1.2 s of sends
    assert sum(map(len, received)) == 4 * storage_download.READ_BYTES
    assert await _transfers_down(patient_app) == 0
