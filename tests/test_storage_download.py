"""Object reads against the storage emulator: how many backend requests each kind of read makes,
the fallback when the media response says too little, and the transferred-bytes count."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import make_settings, metric_value
from quart.typing import TestClientProtocol as Client

from service import storage_download
from service.clients.storage import StorageClient
from service.config import Settings
from service.dev.emulators import StorageEmulator


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
