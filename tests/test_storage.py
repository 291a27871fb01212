"""Cloud Storage routes against the storage emulator: through Quart's test client and through a
real Hypercorn server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from conftest import (
    WAIT,
    Server,
    clean_exits,
    create_bucket,
    graceful_timeout,
    make_settings,
    metric_value,
)
from quart import Quart
from quart.typing import TestClientProtocol as Client
from yarl import URL

from devtools.emulators import StorageEmulator
from service.config import Settings

NAMES = ["plain.txt", "dir/sub/file.bin", "with space/and more.txt", "ünï/ключ/名前.txt", "dir/"]
BAD_NAMES = [
    ".",
    "..",
    "x" * 1025,
    "é" * 513,
    "a\nb",
    "tab\there",
    "del\x7f",
    "c1\x85",
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
    for data, content_type in (
        (f"héllo {name}\n".encode(), "text/plain; charset=utf-8"),
        (bytes(range(256)) * 3, "application/x-thing"),
    ):
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

    for bad in (
        {"maxResults": "0"},
        {"maxResults": "1001"},
        {"maxResults": "x"},
        {"pageToken": "not-a-token"},
    ):
        response = await client.get(path(bucket), query_string=bad)
        assert response.status_code == 400, bad
        assert (await response.get_json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_range_reads(client: Client, bucket: str) -> None:
    data = bytes(range(100))
    assert (await client.put(path(bucket, "r"), data=data)).status_code == 201
    for header, start, end in (
        ("bytes=2-5", 2, 5),
        ("bytes=-3", 97, 99),
        ("bytes=90-", 90, 99),
        ("bytes=95-500", 95, 99),
    ):
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


async def test_empty_object(client: Client, bucket: str) -> None:
    response = await client.put(path(bucket, "empty"), data=b"")
    assert response.status_code == 201
    assert (await response.get_json())["size"] == "0"
    response = await client.get(path(bucket, "empty"), headers={"Range": "bytes=0-10"})
    assert response.status_code == 200
    assert await response.get_data() == b""


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
    for method, url in (
        ("PUT", path(OTHER_BUCKET, "x")),
        ("GET", path(OTHER_BUCKET, "x")),
        ("GET", path(OTHER_BUCKET)),
        ("DELETE", path(OTHER_BUCKET, "x")),
    ):
        response = await client.open(url, method=method, data=b"x")
        body = await response.get_json()
        assert response.status_code == 404, body
        assert "not served here" in body["error"]["message"]
    assert await _emulator_objects(storage_emulator, OTHER_BUCKET) == []

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
        assert await _emulator_objects(storage_emulator, bucket) == []
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
    assert await _emulator_objects(storage_emulator, bucket) == []
    assert (await client.get(path(bucket, "cut"))).status_code == 404
    assert asyncio.all_tasks() - before == set()


# -- through a real Hypercorn server -------------------------------------------------------


def server_env(emulator: StorageEmulator, bucket: str, **extra: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": emulator.url, "LOOPGATE_BUCKETS": bucket, **extra}


def url(server: Server, bucket: str, name: str | None = None) -> URL:
    """The object's URL with the name percent-encoded exactly (dots included)."""
    encoded = "" if name is None else "/" + quote(name, safe="/").replace(".", "%2E")
    return URL(f"{server.url}/v1/buckets/{bucket}/objects{encoded}", encoded=True)


async def test_server_objects_end_to_end(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    server = await start_server(env=server_env(storage_emulator, bucket), workers=1)
    async with aiohttp.ClientSession() as http:
        for name in NAMES:
            data = os.urandom(3000) + name.encode()
            async with http.put(
                url(server, bucket, name), data=data, headers={"Content-Type": "image/x-test"}
            ) as response:
                meta = await response.json()
                assert response.status == 201, meta
                assert meta["name"] == name and int(meta["size"]) == len(data)
            async with http.get(url(server, bucket, name)) as response:
                assert response.status == 200
                assert await response.read() == data
                assert response.headers["Content-Type"] == "image/x-test"
                etag = response.headers["ETag"]
            async with http.head(url(server, bucket, name)) as response:
                assert response.status == 200
                assert int(response.headers["Content-Length"]) == len(data)
                assert response.headers["ETag"] == etag
            async with http.get(url(server, bucket, name), headers={"If-None-Match": etag}) as r:
                assert r.status == 304
            async with http.get(url(server, bucket, name), headers={"Range": "bytes=10-19"}) as r:
                assert r.status == 206
                assert await r.read() == data[10:20]
        async with http.get(url(server, bucket), params={"delimiter": "/"}) as response:
            body = await response.json()
            assert [item["name"] for item in body["items"]] == ["plain.txt"]
            assert body["prefixes"] == ["dir/", "with space/", "ünï/"]

        headers = {"If-None-Match": "*"}
        async with http.put(url(server, bucket, "plain.txt"), data=b"new", headers=headers) as r:
            assert r.status == 412
        async with http.delete(url(server, bucket, "plain.txt")) as response:
            assert response.status == 204
        async with http.delete(url(server, bucket, "plain.txt")) as response:
            assert response.status == 404

        for name in BAD_NAMES:
            async with http.put(url(server, bucket, name), data=b"x") as response:
                assert response.status == 400, name
                assert (await response.json())["error"]["status"] == "INVALID_ARGUMENT"
        async with http.put(url(server, OTHER_BUCKET, "x"), data=b"x") as response:
            assert response.status == 404
        async with http.get(url(server, bucket), params={"prefix": "plain"}) as response:
            assert (await response.json())["items"] == []


def minor_faults(pid: int) -> int:
    """The page faults a process has taken that needed no read from disk (fresh pages among
    them): /proc/PID/stat's tenth field."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


async def test_server_downloads_reuse_the_heap_instead_of_faulting_in_fresh_pages(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    # With glibc's default thresholds a worker here took 140-200 page faults per 1 MB download
    # (the object's size in fresh pages, zeroed by the kernel); settled (service/malloctune.py),
    # its chunks are served from the heap it already has.
    server = await start_server(env=server_env(storage_emulator, bucket), workers=1)
    worker = await _worker_pid(server)
    data = os.urandom(1024 * 1024)
    async with aiohttp.ClientSession() as http:
        async with http.put(url(server, bucket, "heap"), data=data) as response:
            assert response.status == 201, await response.text()

        async def download() -> None:
            async with http.get(url(server, bucket, "heap")) as response:
                assert response.status == 200
                assert len(await response.read()) == len(data)

        for _ in range(5):  # the heap grows to what downloads need
            await download()
        before = minor_faults(worker)
        for _ in range(20):
            await download()
        per_download = (minor_faults(worker) - before) / 20
    assert per_download < 25, per_download
    assert "glibc allocator settled" in server.log()


async def test_server_refuses_large_body_before_reading_it(
    start_server: Callable[..., Awaitable[Server]],
    storage_emulator: StorageEmulator,
    bucket: str,
    server_name: str,
) -> None:
    env = server_env(storage_emulator, bucket, LOOPGATE_MAX_OBJECT_BYTES="1048576")
    server = await start_server(env=env, workers=1, server=server_name)
    async with aiohttp.ClientSession() as http:
        # With "Expect: 100-continue" the client sends the body only if asked: it never is.
        async with http.put(
            url(server, bucket, "big"), data=io.BytesIO(b"x" * (2 * MB)), expect100=True
        ) as response:
            assert response.status == 413
            assert (await response.json())["error"]["status"] == "PAYLOAD_TOO_LARGE"
    assert await _emulator_objects(storage_emulator, bucket) == []


async def test_server_finishes_the_exchange_of_a_refused_upload(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    """A refused upload's body is received and dropped, so the client gets its answer and the
    connection serves the next request, instead of hanging on the unread rest of the body."""
    server = await start_server(env=server_env(storage_emulator, bucket), workers=1)
    worker = await _worker_pid(server)
    async with aiohttp.ClientSession() as http:
        async with http.put(url(server, bucket, "exists"), data=b"x") as response:
            assert response.status == 201
    # The emulator serves one request at a time: a request whose body is still to come holds
    # it, so loopgate's precondition check waits while the upload's body piles up unread.
    held = f'{{"name": "held-{bucket}"}}'.encode()
    _, emulator = await asyncio.open_connection("127.0.0.1", storage_emulator.port)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    size = 16 * MB
    try:
        emulator.write(
            f"POST /storage/v1/b?project=p HTTP/1.1\r\nHost: emulator\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(held)}\r\n\r\n".encode()
        )
        await emulator.drain()
        writer.write(
            f"PUT /v1/buckets/{bucket}/objects/exists HTTP/1.1\r\nHost: loopgate\r\n"
            f"If-None-Match: *\r\nContent-Length: {size}\r\n\r\n".encode()
            + b"x" * size
        )
        sending = asyncio.create_task(writer.drain())

        async def stalled() -> bool:
            return _unread_bytes(worker, server.port) > 256 * 1024

        await _eventually(stalled)
        emulator.write(held)
        await emulator.drain()
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 412 ")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            await sending
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: loopgate\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
        emulator.close()
    assert await _emulator_objects(storage_emulator, bucket) == ["exists"]


async def test_server_200mb_round_trip_in_bounded_memory(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    server = await start_server(env=server_env(storage_emulator, bucket), workers=1)
    worker = await _worker_pid(server)
    count = 200
    expected = hashlib.md5()
    for index in range(count):
        expected.update(index.to_bytes(4, "big") * (MB // 4))
    async with aiohttp.ClientSession() as http:
        # Warm up both directions so that lazily made buffers and imports are in the baseline.
        for _ in range(2):
            warm = io.BytesIO(os.urandom(8 * MB))
            async with http.put(url(server, bucket, "warm"), data=warm) as r:
                assert r.status == 201
            async with http.get(url(server, bucket, "warm")) as r:
                assert len(await r.read()) == 8 * MB
        baseline = _rss(worker)
        peak = baseline
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, _rss(worker))
                await asyncio.sleep(0.02)

        halfway, resume = asyncio.Event(), asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            for index in range(count):
                if index == count // 2:
                    halfway.set()
                    await resume.wait()
                yield index.to_bytes(4, "big") * (MB // 4)

        async def upload() -> dict[str, Any]:
            headers = {"Content-Length": str(count * MB), "Content-Type": "application/x-big"}
            async with http.put(
                url(server, bucket, "big/object"), data=body(), headers=headers
            ) as response:
                assert response.status == 201
                meta: dict[str, Any] = await response.json()
                return meta

        sampler = asyncio.create_task(sample())
        try:
            uploading = asyncio.create_task(upload())
            await asyncio.wait_for(halfway.wait(), WAIT)
            # The same worker keeps answering while the upload is in flight.
            async with http.get(f"{server.url}/healthz") as response:
                assert response.status == 200
            assert not uploading.done()
            resume.set()
            meta = await asyncio.wait_for(uploading, 90)
            assert int(meta["size"]) == count * MB
            received = hashlib.md5()
            async with http.get(url(server, bucket, "big/object")) as response:
                assert response.status == 200
                assert int(response.headers["Content-Length"]) == count * MB
                async for chunk in response.content.iter_chunked(MB):
                    received.update(chunk)
            assert received.hexdigest() == expected.hexdigest()
        finally:
            sampling = False
            await sampler
    growth = peak - baseline
    assert growth < 50 * MB, f"worker RSS grew by {growth / MB:.1f} MB"


async def test_server_client_dropping_mid_upload(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    server = await start_server(env=server_env(storage_emulator, bucket), workers=1)
    worker = await _worker_pid(server)
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"PUT /v1/buckets/{bucket}/objects/dropped HTTP/1.1\r\nHost: loopgate\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {64 * MB}\r\n\r\n".encode()
    )
    for _ in range(16):
        writer.write(b"d" * MB)
        await writer.drain()

    async def forwarding() -> bool:
        text = await _metrics(server)
        return (
            metric_value(text, "loopgate_storage_bytes_total", direction="up") >= 4 * MB
            and metric_value(text, "loopgate_storage_transfers", direction="up") == 1
            and _emulator_connections(worker, storage_emulator.port) >= 1
        )

    await _eventually(forwarding)
    writer.transport.abort()

    await _eventually(_released(server, worker, storage_emulator, "up"))
    assert "dropped" not in await _emulator_objects(storage_emulator, bucket)
    async with aiohttp.ClientSession() as http:
        async with http.get(url(server, bucket, "dropped")) as response:
            assert response.status == 404

        # The same for a download cut short.
        async with http.put(url(server, bucket, "large"), data=io.BytesIO(b"l" * 64 * MB)) as r:
            assert r.status == 201
        async with http.get(url(server, bucket, "large")) as response:
            assert response.status == 200
            await response.content.readexactly(MB)

            async def downloading() -> bool:
                text = await _metrics(server)
                return metric_value(text, "loopgate_storage_transfers", direction="down") == 1

            await _eventually(downloading)
            response.close()

    await _eventually(_released(server, worker, storage_emulator, "down"))
    assert "Traceback" not in server.log()


async def test_server_storage_down_then_recovers(
    start_server: Callable[..., Awaitable[Server]],
) -> None:
    emulator = StorageEmulator().start()
    try:
        bucket = create_bucket(emulator)
        server = await start_server(env=server_env(emulator, bucket), workers=1)
        async with aiohttp.ClientSession() as http:
            async with http.put(url(server, bucket, "x"), data=b"before") as response:
                assert response.status == 201
            emulator.stop()
            for method, target in (
                ("GET", url(server, bucket, "x")),
                ("PUT", url(server, bucket, "y")),
                ("PUT", url(server, bucket, "z")),
                ("GET", url(server, bucket)),
            ):
                data = io.BytesIO(b"y" * (5 * MB) if target.name == "z" else b"y")
                async with http.request(method, target, data=data) as response:
                    body = await response.json()
                    assert response.status == 503, body
                    assert int(response.headers["Retry-After"]) >= 1
                    assert body["error"]["status"] == "UNAVAILABLE"
                    assert "storage" in body["error"]["message"]
            emulator.start()
            create_bucket(emulator, bucket)
            async with http.put(url(server, bucket, "y"), data=b"after") as response:
                assert response.status == 201
            async with http.get(url(server, bucket, "y")) as response:
                assert await response.read() == b"after"
    finally:
        emulator.stop()


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


async def _emulator_objects(emulator: StorageEmulator, bucket: str) -> list[str]:
    """The bucket's object names, asked of the emulator directly.

    Off the loop: the emulator serves one request at a time, and may still be reading an
    upload that the app (on this loop, in the in-process tests) is about to abort.
    """
    import json
    import urllib.request

    def names() -> list[str]:
        url = f"{emulator.url}/storage/v1/b/{bucket}/o"
        with urllib.request.urlopen(url, timeout=WAIT) as r:
            return [item["name"] for item in json.loads(r.read()).get("items", [])]

    return await asyncio.to_thread(names)


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = WAIT) -> None:
    """Wait until ``check`` holds. It reads state of another process (/proc, /metrics) that
    signals no event, so it is polled; the deadline bounds the wait."""
    async with asyncio.timeout(within):
        while not await check():
            await asyncio.sleep(0.05)


def _released(
    server: Server, worker: int, emulator: StorageEmulator, direction: str
) -> Callable[[], Awaitable[bool]]:
    """A check that no transfer in ``direction`` is in progress and that the worker holds no
    connection to the emulator."""

    async def check() -> bool:
        text = await _metrics(server)
        return (
            metric_value(text, "loopgate_storage_transfers", direction=direction) == 0
            and _emulator_connections(worker, emulator.port) == 0
        )

    return check


async def _metrics(server: Server) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/metrics") as response:
        return await response.text()


async def _worker_pid(server: Server) -> int:
    """The Hypercorn worker: the child of the server process that multiprocessing spawned (the
    other child is multiprocessing's resource tracker)."""
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")

    def workers() -> list[int]:
        return [
            int(pid)
            for pid in children.read_text().split()
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    async def started() -> bool:
        return bool(workers())

    await _eventually(started)
    pids = workers()
    assert len(pids) == 1, pids
    return pids[0]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _emulator_connections(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``127.0.0.1:port``."""
    inodes = _socket_inodes(pid)
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote, state, inode = fields[2], fields[3], fields[9]
        if state == "01" and int(remote.split(":")[1], 16) == port and inode in inodes:
            count += 1
    return count


def _unread_bytes(pid: int, port: int) -> int:
    """Bytes waiting unread in the receive queues of ``pid``'s connections on local ``port``."""
    inodes = _socket_inodes(pid)
    unread = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[9] in inodes:
            unread += int(fields[4].split(":")[1], 16)
    return unread


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


@pytest.mark.parametrize("length", [1 * MB, 64 * MB], ids=["one-request", "resumable"])
async def test_server_an_upload_whose_client_goes_quiet_is_abandoned_with_408(
    start_server: Callable[..., Awaitable[Server]],
    storage_emulator: StorageEmulator,
    bucket: str,
    length: int,
) -> None:
    env = server_env(storage_emulator, bucket, LOOPGATE_UPLOAD_IDLE_TIMEOUT="1")
    server = await start_server(env=env, workers=1)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"PUT /v1/buckets/{bucket}/objects/quiet HTTP/1.1\r\nHost: loopgate\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode()
        + b"q" * (length // 4)
    )
    await writer.drain()
    # ... and then nothing more, while keeping the connection open.
    status_line = await asyncio.wait_for(reader.readline(), WAIT)
    assert status_line.split()[1] == b"408", status_line
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    size = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    body = json.loads(await asyncio.wait_for(reader.readexactly(size), WAIT))
    assert body["error"]["code"] == 408 and "nothing" in body["error"]["message"]
    writer.close()
    assert "quiet" not in await _emulator_objects(storage_emulator, bucket)


async def _stalled_download(server: Server, bucket: str, name: str) -> asyncio.StreamWriter:
    """A GET of ``name`` whose client reads the response head and then nothing more, keeping the
    connection open; the object must be larger than every buffer on the way (64 MB is)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=64 * 1024)
    writer.write(
        f"GET /v1/buckets/{bucket}/objects/{name} HTTP/1.1\r\nHost: loopgate\r\n\r\n".encode()
    )
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), WAIT)
    assert status_line.split()[1] == b"200", status_line
    return writer


async def _put_large(server: Server, bucket: str, name: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(url(server, bucket, name), data=io.BytesIO(b"s" * 64 * MB)) as r:
            assert r.status == 201, await r.text()


async def test_server_a_download_whose_client_stops_reading_is_ended(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    env = server_env(storage_emulator, bucket, LOOPGATE_DOWNLOAD_IDLE_TIMEOUT="1")
    server = await start_server(env=env, workers=1)
    worker = await _worker_pid(server)
    await _put_large(server, bucket, "stalled")
    writer = await _stalled_download(server, bucket, "stalled")

    # The backend connection is let go while the client still holds its own (it never closes it
    # before the end of the test).
    await _eventually(_released(server, worker, storage_emulator, "down"))
    async with aiohttp.ClientSession() as http:
        async with http.get(url(server, bucket, "stalled")) as response:
            assert response.status == 200
            assert len(await response.read()) == 64 * MB
    writer.transport.abort()
    assert "abandoned" in server.log() and "Traceback" not in server.log()


async def test_server_storage_calls_answer_503_when_every_connection_is_busy(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    env = server_env(
        storage_emulator,
        bucket,
        LOOPGATE_HTTP_MAX_CONNECTIONS="1",
        LOOPGATE_STORAGE_CONNECT_TIMEOUT="0.5",
    )
    server = await start_server(env=env, workers=1)
    await _put_large(server, bucket, "busy")
    writer = await _stalled_download(server, bucket, "busy")  # holds the only connection
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        for method in ("GET", "PUT", "DELETE"):
            async with http.request(method, url(server, bucket, "other"), data=b"x") as response:
                body = await response.json()
                assert response.status == 503, body
                assert int(response.headers["Retry-After"]) >= 1
                assert body["error"]["status"] == "UNAVAILABLE"
                assert "connection" in body["error"]["message"]
        writer.transport.abort()

        async def served() -> bool:
            async with http.put(url(server, bucket, "other"), data=b"after") as response:
                return response.status == 201

        await _eventually(served)


# Granian 2.8 serves a worker's last responses from Rust until they are sent, before the worker's
# loop runs the app's lifespan shutdown: a download whose client reads nothing holds the worker,
# even once loopgate has abandoned it (LOOPGATE_DOWNLOAD_IDLE_TIMEOUT), until the master kills it
# at --workers-kill-timeout. Nothing in the app can reach that connection.
GRANIAN_HELD = (
    "Granian keeps a worker whose download client reads nothing until its master kills it at "
    "--workers-kill-timeout; the lifespan shutdown never runs"
)


@pytest.mark.parametrize(
    "server_name",
    [
        "hypercorn",
        "uvicorn",
        pytest.param("granian", marks=pytest.mark.xfail(strict=True, reason=GRANIAN_HELD)),
    ],
    indirect=True,
)
async def test_server_stops_with_a_download_whose_client_reads_nothing(
    start_server: Callable[..., Awaitable[Server]],
    storage_emulator: StorageEmulator,
    bucket: str,
    server_name: str,
) -> None:
    # Hypercorn cancels the connection at its graceful timeout, then would wait forever to flush
    # what it holds for a client that reads nothing; the close is bounded (service/server/hypercorn/close.py).
    server = await start_server(
        env=server_env(storage_emulator, bucket),
        workers=1,
        args=graceful_timeout(server_name, 4),
        server=server_name,
    )
    await _put_large(server, bucket, "unread")
    writer = await _stalled_download(server, bucket, "unread")
    try:
        assert await asyncio.to_thread(server.stop) in clean_exits(server_name), server.log()
    finally:
        writer.transport.abort()
    log = server.log()
    if server_name == "hypercorn":
        assert "reset" in log
    assert "refused to gracefully stop" not in log, log  # Granian's master killed the worker
    # Hypercorn logs the cancellation of the connection it ended at its graceful timeout (a
    # traceback through asyncio and Hypercorn only); uvicorn logs the cancellation of the task
    # it ended at its own as an exception of the app. Nothing else may fail in loopgate's code.
    cancelled = "CancelledError: Task cancelled, timeout graceful shutdown exceeded"
    rest = "\n".join(
        line
        for line in log.splitlines()
        if not (server_name == "uvicorn" and _logged_exception(line).endswith(cancelled))
    )
    assert "Error in ASGI" not in rest and f"{os.sep}service{os.sep}" not in rest, rest


def _logged_exception(line: str) -> str:
    """The traceback a JSON log line carries, or ``""``."""
    try:
        entry = json.loads(line)
    except ValueError:
        return ""
    return str(entry.get("exception", "")).rstrip() if isinstance(entry, dict) else ""
