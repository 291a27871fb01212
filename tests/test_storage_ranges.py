"""Ranged reads against the storage emulator, checked form by form against RFC 9110 section 14:
through Quart's test client and through a real Hypercorn server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from conftest import Server, make_settings
from quart.typing import TestClientProtocol as Client

from devtools.emulators import StorageEmulator
from service.config import Settings
from service.errors import RangeNotSatisfiable
from service.routes import storage_download

DATA = b"0123456789"
WHOLE = (200, None, DATA)
# (Range header, expected status, Content-Range, body) for the 10 bytes of DATA.
RANGES: list[tuple[str, int, str | None, bytes]] = [
    ("bytes=2-4", 206, "bytes 2-4/10", b"234"),
    ("bytes=0-0", 206, "bytes 0-0/10", b"0"),
    ("bytes=9-9", 206, "bytes 9-9/10", b"9"),
    ("bytes=0-", 206, "bytes 0-9/10", DATA),
    ("bytes=7-", 206, "bytes 7-9/10", b"789"),
    ("bytes=5-100", 206, "bytes 5-9/10", b"56789"),  # last past the end: cut to the end
    ("bytes=-3", 206, "bytes 7-9/10", b"789"),
    ("bytes=-10", 206, "bytes 0-9/10", DATA),
    ("bytes=-100", 206, "bytes 0-9/10", DATA),  # a suffix longer than the object: all of it
    ("Bytes=1-2", 206, "bytes 1-2/10", b"12"),  # the unit is case-insensitive
    ("bytes=1-2,", 206, "bytes 1-2/10", b"12"),  # an empty list element is ignored
    ("bytes= 1-2 ", 206, "bytes 1-2/10", b"12"),
    ("bytes=10-", 416, "bytes */10", b""),  # first at the end
    ("bytes=10-20", 416, "bytes */10", b""),
    ("bytes=99999999999999999999-", 416, "bytes */10", b""),
    ("bytes=-0", 416, "bytes */10", b""),  # a suffix of 0 selects nothing
    ("bytes=-000", 416, "bytes */10", b""),
    # Not a range loopgate serves: the header is ignored.
    ("bytes=5-2", *WHOLE),  # last before first: invalid
    ("bytes=abc", *WHOLE),
    ("bytes=+1-2", *WHOLE),
    ("bytes=1-2-3", *WHOLE),
    ("bytes=", *WHOLE),
    ("bytes 0-1", *WHOLE),
    ("items=0-1", *WHOLE),  # another unit
    ("bytes=0-1,5-6", *WHOLE),  # several ranges
    ("bytes=-5,-3", *WHOLE),
    ("bytes=20-30,40-50", *WHOLE),
]


@pytest.fixture
def settings(storage_emulator: StorageEmulator, bucket: str) -> Settings:
    return make_settings(buckets=bucket)


def path(bucket: str, name: str) -> str:
    return f"/v1/buckets/{bucket}/objects/{name}"


def if_range_cases(etag: str) -> list[tuple[dict[str, str], int]]:
    """Headers with an ``If-Range`` and the status they get: 206 only when it matches."""
    return [
        ({"Range": "bytes=2-4", "If-Range": etag}, 206),
        ({"Range": "bytes=2-4", "If-Range": '"other"'}, 200),
        ({"Range": "bytes=2-4", "If-Range": f"W/{etag}"}, 200),  # weak: never matches
        ({"Range": "bytes=2-4", "If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}, 200),
        ({"If-Range": etag}, 200),  # no Range: nothing to condition
    ]


async def test_range_forms(client: Client, bucket: str) -> None:
    assert (await client.put(path(bucket, "ten"), data=DATA)).status_code == 201
    for header, status, content_range, body in RANGES:
        response = await client.get(path(bucket, "ten"), headers={"Range": header})
        assert response.status_code == status, header
        assert response.headers.get("Content-Range") == content_range, header
        if status == 416:
            assert (await response.get_json())["error"]["status"] == "OUT_OF_RANGE", header
        else:
            assert await response.get_data() == body, header
            assert response.headers["Content-Length"] == str(len(body)), header


async def test_if_range_and_head(client: Client, bucket: str) -> None:
    response = await client.put(path(bucket, "ten"), data=DATA)
    etag = response.headers["ETag"]
    for headers, status in if_range_cases(etag):
        response = await client.get(path(bucket, "ten"), headers=headers)
        assert response.status_code == status, headers
        assert await response.get_data() == (b"234" if status == 206 else DATA), headers
    # Range is defined for GET only: HEAD describes the whole object. (The test client rebuilds
    # Content-Length from the empty body; the server test checks it.)
    response = await client.head(path(bucket, "ten"), headers={"Range": "bytes=2-4"})
    assert response.status_code == 200
    assert "Content-Range" not in response.headers


async def test_server_range_forms(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    env = {"STORAGE_EMULATOR_HOST": storage_emulator.url, "LOOPGATE_BUCKETS": bucket}
    server = await start_server(env=env, workers=1)
    target = f"{server.url}{path(bucket, 'ten')}"
    async with aiohttp.ClientSession() as http:
        async with http.put(target, data=DATA) as response:
            assert response.status == 201
            etag = response.headers["ETag"]
        for header, status, content_range, body in RANGES:
            async with http.get(target, headers={"Range": header}) as response:
                assert response.status == status, header
                assert response.headers.get("Content-Range") == content_range, header
                if status != 416:
                    assert await response.read() == body, header
        for headers, status in if_range_cases(etag):
            async with http.get(target, headers=headers) as response:
                assert response.status == status, headers
                assert await response.read() == (b"234" if status == 206 else DATA), headers
        async with http.head(target, headers={"Range": "bytes=2-4"}) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == "10"
            assert "Content-Range" not in response.headers


def test_requested_range_of_an_empty_object_is_the_whole() -> None:
    # No 206 can describe zero bytes, and a server may always ignore Range.
    for header in ("bytes=0-", "bytes=-5", "bytes=-0", "bytes=3-4"):
        assert storage_download.requested_range(header, None, '"e"', 0) is None


def test_requested_range_arithmetic() -> None:
    requested = storage_download.requested_range
    assert requested("bytes=-1", None, '"e"', 1) == (0, 0)
    assert requested("bytes=0-0", None, '"e"', 1) == (0, 0)
    assert requested("bytes=-2", '"e"', '"e"', 5) == (3, 4)
    assert requested("bytes=-2", ' "e" ', '"e"', 5) == (3, 4)
    assert requested("bytes=-2", '"E"', '"e"', 5) is None  # entity tags are case-sensitive
    assert requested(None, None, '"e"', 5) is None
    with pytest.raises(RangeNotSatisfiable) as raised:
        requested("bytes=1-", None, '"e"', 1)
    assert raised.value.headers() == {"Content-Range": "bytes */1"}
