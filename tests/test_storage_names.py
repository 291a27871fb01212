"""Object names and listing parameters: the rules of service.clients.storage.names on their own,
then through the storage routes (Quart's test client, given the raw path a server would pass, and a
real Hypercorn server) against the storage emulator."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from conftest import Server, make_settings
from quart.typing import TestClientProtocol as Client
from quart.wrappers import Response
from yarl import URL

from devtools.emulators import StorageEmulator
from service.clients.storage import names
from service.config import Settings
from service.errors import InvalidArgument

# Percent-encoded names that are not UTF-8: each would otherwise be stored as U+FFFD characters.
NOT_UTF8 = [
    "%FF",
    "%ED%A0%80",  # an encoded surrogate
    "a/%C0%AF",  # an overlong "/"
    "%F4%90%80%80",  # past U+10FFFF
    "x%E2%82",  # cut short
    "ok/%FE/x",
]
# '.' and '..' as segments (or as the whole name), however they are encoded.
DOT_SEGMENTS = [
    "%2E",
    "%2E%2E",
    "a/%2E%2E/b",
    "%2E%2E/a",
    "a/%2E%2E",
    "a%2F%2E%2E%2Fb",
    "a/%2E/b",
    "%2E/a",
    "a/%2E",
]
# Names near those that stay valid: (percent-encoded, decoded).
VALID = [
    ("%EF%BF%BD", "\ufffd"),  # U+FFFD itself, sent as UTF-8
    ("%E2%82%AC/%F0%9F%99%82", "€/🙂"),
    ("a%2E%2Eb/%2E%2E%2Ec/%2Ehidden", "a..b/...c/.hidden"),
    ("dir/", "dir/"),
]
METHODS = ("PUT", "GET", "HEAD", "DELETE")


@pytest.fixture
def settings(storage_emulator: StorageEmulator, bucket: str) -> Settings:
    return make_settings(buckets=bucket)


def object_path(bucket: str, encoded: str) -> str:
    return f"/v1/buckets/{bucket}/objects/{encoded}"


# -- the rules ----------------------------------------------------------------------------------


def test_dot_segments_are_refused() -> None:
    for name in (".", "..", "a/../b", "../a", "a/..", "a/./b", "./a", "a/.", "a//./b"):
        assert names.name_problem(name) is not None, name
    for name in ("a..b", "...", ".hidden", "a/.../b", "a/b.", "a/.b/", "a//b", "dir/"):
        assert names.name_problem(name) is None, name


def test_undecodable_percent_escapes() -> None:
    assert names.undecodable(b"/v1/buckets/b/objects/%FF") == "%FF"
    assert names.undecodable(b"%ED%A0%80") == "%ED"
    assert names.undecodable(b"ok%C0%AF") == "%C0"
    assert names.undecodable(b"x%E2%82") == "%E2%82"
    assert names.undecodable("\xff".encode("latin-1")) == "%FF"  # raw, unescaped
    for raw in (b"%EF%BF%BD", b"%E2%82%AC", "€".encode(), b"plain", b"100%", b"%G1", b""):
        assert names.undecodable(raw) is None, raw


def test_check_name_sees_the_raw_path() -> None:
    replaced = "\ufffd"  # what the server's decoding makes of both %FF and %EF%BF%BD
    names.check_name(replaced)
    names.check_name(replaced, b"/v1/buckets/b/objects/%EF%BF%BD")
    for raw in NOT_UTF8:
        with pytest.raises(InvalidArgument, match="not valid UTF-8"):
            names.check_name(replaced, f"/v1/buckets/b/objects/{raw}".encode())


def test_check_query() -> None:
    names.check_query(b"")
    names.check_query(b"prefix=%E2%82%AC&delimiter=/&maxResults=5&flag&=x")
    names.check_query(b"prefix=a/%2E%2E/&prefix=a+b")
    for query in (b"prefix=%FF", b"delimiter=%ED%A0%80", b"maxResults=1&prefix=a%C0%AF", b"%FF=1"):
        with pytest.raises(InvalidArgument, match="not valid UTF-8"):
            names.check_query(query)


# -- through the routes ---------------------------------------------------------------------------


async def send(client: Client, method: str, target: str) -> Response:
    """``method`` on ``target`` (percent-encoded) with the raw path Hypercorn would pass; the test
    client itself derives ``raw_path`` from the decoded path, which has lost the bytes."""
    return await client.open(
        target,
        method=method,
        data=b"x" if method == "PUT" else b"",
        scope_base={"raw_path": target.partition("?")[0].encode()},
    )


async def test_names_refused_before_the_backend(client: Client, bucket: str) -> None:
    for encoded in NOT_UTF8 + DOT_SEGMENTS:
        for method in METHODS:
            response = await send(client, method, object_path(bucket, encoded))
            assert response.status_code == 400, (method, encoded)
            assert "Retry-After" not in response.headers
            if method != "HEAD":
                body = await response.get_json()
                assert body["error"]["status"] == "INVALID_ARGUMENT", (method, encoded)
    # Nothing was stored, under the replaced name or any other.
    listed = await (await client.get(f"/v1/buckets/{bucket}/objects")).get_json()
    assert listed["items"] == []


async def test_names_near_the_refused_ones_work(client: Client, bucket: str) -> None:
    for encoded, name in VALID:
        response = await send(client, "PUT", object_path(bucket, encoded))
        assert response.status_code == 201, encoded
        assert (await response.get_json())["name"] == name
        response = await send(client, "GET", object_path(bucket, encoded))
        assert (response.status_code, await response.get_data()) == (200, b"x"), encoded
        assert (await send(client, "DELETE", object_path(bucket, encoded))).status_code == 204


async def test_listing_parameters_must_be_utf8(client: Client, bucket: str) -> None:
    listing = f"/v1/buckets/{bucket}/objects"
    for query in ("prefix=%FF", "prefix=%ED%A0%80", "delimiter=%FF", "prefix=a&prefix=%C0%AF"):
        response = await send(client, "GET", f"{listing}?{query}")
        assert response.status_code == 400, query
        assert (await response.get_json())["error"]["status"] == "INVALID_ARGUMENT", query
    # A prefix is no path: dot segments in it are fine.
    response = await send(client, "GET", f"{listing}?prefix=a/%2E%2E/&delimiter=/")
    assert response.status_code == 200


async def test_server_refuses_names_that_alias_or_resolve(
    start_server: Callable[..., Awaitable[Server]], storage_emulator: StorageEmulator, bucket: str
) -> None:
    env = {"STORAGE_EMULATOR_HOST": storage_emulator.url, "LOOPGATE_BUCKETS": bucket}
    server = await start_server(env=env, workers=1)

    def url(target: str) -> URL:
        return URL(f"{server.url}{target}", encoded=True)

    async with aiohttp.ClientSession() as http:
        for encoded in NOT_UTF8 + DOT_SEGMENTS:
            for method in METHODS:
                data = b"x" if method == "PUT" else None
                target = url(object_path(bucket, encoded))
                async with http.request(method, target, data=data) as response:
                    assert response.status == 400, (method, encoded)
                    assert "Retry-After" not in response.headers
                    if method != "HEAD":
                        body = await response.json()
                        assert body["error"]["status"] == "INVALID_ARGUMENT", (method, encoded)
        for encoded, name in VALID:
            async with http.put(url(object_path(bucket, encoded)), data=b"x") as response:
                assert response.status == 201, encoded
                assert (await response.json())["name"] == name
        async with http.get(url(f"/v1/buckets/{bucket}/objects")) as response:
            listed = await response.json()
            assert sorted(item["name"] for item in listed["items"]) == sorted(n for _, n in VALID)
        for query in ("prefix=%FF", "prefix=%ED%A0%80", "delimiter=%FF"):
            async with http.get(url(f"/v1/buckets/{bucket}/objects?{query}")) as response:
                assert response.status == 400, query
