"""Cloud Storage routes against the storage emulator: through Quart's test client and through a
real Hypercorn server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import WAIT, Server, create_bucket, make_settings, metric_value
from quart import Quart
from quart.typing import TestClientProtocol as Client
from yarl import URL

from service.config import Settings
from service.dev.emulators import StorageEmulator

NAMES = ["plain.txt", "dir/sub/file.bin", "with space/and more.txt", "ünï/ключ/名前.txt", "dir/"]
BAD_NAMES = [
    ".", "..", "x" * 1025, "é" * 513, "a\nb", "tab\there", "del\x7f", "c1\x85",
    ".well-known/acme-challenge/token",
]
OTHER_BUCKET = "not-allowed-here"
MB = 1024 * 1024


@pytest.fixture
def settings(storage_emulator: StorageEmulator, bucket: str) -> Settings:
    return make_settings(buckets=f"{bucket},missing-bucket-{bucket}")


def path(bucket: str, name: str | None = None) -> str:
    base = f"/v1/buckets/{bucket}/objects"
    return base if name is None else f"{base}/{name}"


async def listing(client: Client, bucket: str, **args: str) -> dict[str, Any]:
    response = await client.get(path(bucket), query_string=args)
    body: dict[str, Any] = await response.get_json()
    assert response.status_code == 200, body
    return body


# -- through Quart's test client --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
async def test_round_trip_text_and_binary(client: Client, bucket: str, name: str) -> None:
    for data, content_type in ((f"héllo {name}\n".encode(), "text/plain; charset=utf-8"),
                               (bytes(range(256)) * 3, "application/x-thing")):
        response = await client.put(
            path(bucket, name), data=data, headers={"Content-Type": content_type}
        )
        meta = await response.get_json()
        assert response.status_code == 201, meta
        assert meta["name"] == name
        assert int(meta["size"]) == len(data)
        assert meta["contentType"] == content_type
        assert meta["generation"] and meta["updated"] and (meta.get("md5Hash") or meta["crc32c"])

        response = await client.get(path(bucket, name))
        assert response.status_code == 200
        assert await response.get_data() == data
        assert response.headers["Content-Type"] == content_type
        assert response.headers["ETag"].strip('"') == meta["etag"]
        assert int(response.headers["Content-Length"]) == len(data)

        response = await client.head(path(bucket, name))
        assert response.status_code == 200
        assert response.headers["ETag"].strip('"') == meta["etag"]
    names = [item["name"] for item in (await listing(client, bucket))["items"]]
    assert names == [name]


async def test_list_prefix_delimiter_and_paging(client: Client, bucket: str) -> None:
    names = ["a/1", "a/2", "a/b/3", "b/4", "c", "d/5", "e"]
    for name in names:
        response = await client.put(path(bucket, name), data=name.encode())
        assert response.status_code == 201

    body = await listing(client, bucket, prefix="a/")
    assert [item["name"] for item in body["items"]] == ["a/1", "a/2", "a/b/3"]
    assert "nextPageToken" not in body

    body = await listing(client, bucket, delimiter="/")
    assert [item["name"] for item in body["items"]] == ["c", "e"]
    assert body["prefixes"] == ["a/", "b/", "d/"]

    body = await listing(client, bucket, prefix="a/", delimiter="/")
    assert [item["name"] for item in body["items"]] == ["a/1", "a/2"]
    assert body["prefixes"] == ["a/b/"]

    for args, expected in (({}, names), ({"delimiter": "/"}, ["a/", "b/", "c", "d/", "e"])):
        for size in (1, 2, 3):
            seen: list[str] = []
            token = None
            for _ in range(len(names) + 1):
                query = {**args, "maxResults": str(size)} | ({"pageToken": token} if token else {})
                body = await listing(client, bucket, **query)
                entries = [item["name"] for item in body["items"]] + body["prefixes"]
                assert 1 <= len(entries) <= size
                seen += sorted(entries)
                token = body.get("nextPageToken")
                if token is None:
                    break
            assert seen == expected, (args, size)

    for bad in ({"maxResults": "0"}, {"maxResults": "1001"}, {"maxResults": "x"},
                {"pageToken": "not-a-token"}):
        response = await client.get(path(bucket), query_string=bad)
        assert response.status_code == 400, bad
        assert (await response.get_json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_range_reads(client: Client, bucket: str) -> None:
    data = bytes(range(100))
    assert (await client.put(path(bucket, "r"), data=data)).status_code == 201
    for header, start, end in (("bytes=2-5", 2, 5), ("bytes=-3", 97, 99), ("bytes=90-", 90, 99),
                               ("bytes=95-500", 95, 99)):
        response = await client.get(path(bucket, "r"), headers={"Range": header})
        assert response.status_code == 206, header
        assert await response.get_data() == data[start : end + 1]
        assert response.headers["Content-Range"] == f"bytes {start}-{end}/100"

    response = await client.get(path(bucket, "r"), headers={"Range": "bytes=100-200"})
    assert response.status_code == 416
    assert response.headers["Content-Range"] == "bytes */100"
    # Several ranges are not served as multipart: the whole object comes back.
    response = await client.get(path(bucket, "r"), headers={"Range": "bytes=0-1,5-6"})
    assert response.status_code == 200
    assert await response.get_data() == data


async def test_if_none_match_on_read(client: Client, bucket: str) -> None:
    response = await client.put(path(bucket, "e"), data=b"etag me")
    etag = (await response.get_json())["etag"]
    response = await client.get(path(bucket, "e"), headers={"If-None-Match": f'"{etag}"'})
    assert response.status_code == 304
    assert await response.get_data() == b""
    response = await client.get(path(bucket, "e"), headers={"If-None-Match": '"other"'})
    assert response.status_code == 200
    assert await response.get_data() == b"etag me"


@pytest.mark.parametrize("size", [10, 6 * MB])  # one request, and a streamed resumable upload
async def test_conditional_create(client: Client, bucket: str, size: int) -> None:
    first, second = b"1" * size, b"2" * size
    headers = {"If-None-Match": "*"}
    response = await client.put(path(bucket, "once"), data=first, headers=headers)
    assert response.status_code == 201
    response = await client.put(path(bucket, "once"), data=second, headers=headers)
    body = await response.get_json()
    assert response.status_code == 412, body
    assert body["error"]["status"] == "FAILED_PRECONDITION"
    assert await (await client.get(path(bucket, "once"))).get_data() == first


async def test_delete(client: Client, bucket: str) -> None:
    assert (await client.put(path(bucket, "d/x"), data=b"x")).status_code == 201
    response = await client.delete(path(bucket, "d/x"))
    assert response.status_code == 204
    assert (await client.get(path(bucket, "d/x"))).status_code == 404
    response = await client.delete(path(bucket, "d/x"))
    assert response.status_code == 404
    assert (await response.get_json())["error"]["status"] == "NOT_FOUND"


@pytest.mark.parametrize("name", BAD_NAMES)
async def test_bad_names_are_refused(client: Client, bucket: str, name: str) -> None:
    for method in ("PUT", "GET", "HEAD", "DELETE"):
        response = await client.open(path(bucket, name), method=method, data=b"body")
        assert response.status_code == 400, (method, name)
        if method != "HEAD":
            error = (await response.get_json())["error"]
            assert error["status"] == "INVALID_ARGUMENT"
            assert "invalid object name" in error["message"]
    assert (await listing(client, bucket))["items"] == []


async def test_buckets_outside_the_allowlist(
    client: Client, bucket: str, storage_emulator: StorageEmulator
) -> None:
    if OTHER_BUCKET not in _emulator_buckets(storage_emulator):
        create_bucket(storage_emulator, OTHER_BUCKET)
    for method, url in (("PUT", path(OTHER_BUCKET, "x")), ("GET", path(OTHER_BUCKET, "x")),
                        ("GET", path(OTHER_BUCKET)), ("DELETE", path(OTHER_BUCKET, "x"))):
        response = await client.open(url, method=method, data=b"x")
        body = await response.get_json()
        assert response.status_code == 404, body
        assert "not served here" in body["error"]["message"]
    assert _emulator_objects(storage_emulator, OTHER_BUCKET) == []

    # Allowed, but missing at the backend: the backend's 404.
    response = await client.get(path(f"missing-bucket-{bucket}"))
    assert response.status_code == 404
    response = await client.put(path(f"missing-bucket-{bucket}", "x"), data=b"x")
    assert response.status_code == 404


async def test_body_over_the_limit_is_refused(
    storage_emulator: StorageEmulator, bucket: str
) -> None:
    app = await _started_app(make_settings(buckets=bucket, max_object_bytes=1000))
    try:
        client = app.test_client()
        response = await client.put(path(bucket, "big"), data=b"x" * 1001)
        assert response.status_code == 413
        assert (await response.get_json())["error"]["status"] == "PAYLOAD_TOO_LARGE"
        # No Content-Length: refused once the limit is crossed.
        async with client.request(path(bucket, "big"), method="PUT") as connection:
            for _ in range(3):
                await connection.send(b"y" * 600)
            await connection.send_complete()
        response = await connection.as_response()
        assert response.status_code == 413
        assert _emulator_objects(storage_emulator, bucket) == []
    finally:
        await app.shutdown()


async def test_client_disconnect_mid_upload_leaves_nothing(
    app: Quart, client: Client, bucket: str, storage_emulator: StorageEmulator
) -> None:
    before = asyncio.all_tasks()
    headers = {"Content-Length": str(20 * MB)}
    async with client.request(path(bucket, "cut"), method="PUT", headers=headers) as connection:
        for _ in range(8):
            await connection.send(b"z" * MB)
        await connection.disconnect()
    assert _emulator_objects(storage_emulator, bucket) == []
    assert (await client.get(path(bucket, "cut"))).status_code == 404
    assert asyncio.all_tasks() - before == set()


# -- helpers ----------------------------------------------------------------------------------


async def _started_app(settings: Settings) -> Quart:
    from service import create_app

    app = create_app(settings)
    await app.startup()
    return app


def _emulator_buckets(emulator: StorageEmulator) -> list[str]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b?project=p", timeout=WAIT) as r:
        return [item["name"] for item in json.loads(r.read()).get("items", [])]


def _emulator_objects(emulator: StorageEmulator, bucket: str) -> list[str]:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o", timeout=WAIT) as r:
        return [item["name"] for item in json.loads(r.read()).get("items", [])]
