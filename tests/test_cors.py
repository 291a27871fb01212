"""CORS for browsers (service/cors.py) and the JavaScript client's route (service/routes/client.py):
preflights and answers for allowed and other origins, with Quart's test client and through each
real server."""

from __future__ import annotations

import base64
import fnmatch
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from authkit import JWT_SECRET, bearer, make_jwt
from conftest import ROOT, WAIT, Topic, make_settings
from quart import Quart

from service import create_app

ALLOWED = "https://app.example"
OTHER = "https://evil.example"
CLIENT_FILE = ROOT / "service" / "web" / "loopgate.js"

# The routes a browser calls, and the method its request uses.
BROWSER_ROUTES = [
    ("POST", "/v1/topics/demo:publish"),
    ("GET", "/v1/topics/demo/events"),
    ("PUT", "/v1/buckets/photos/objects/a.jpg"),
    ("GET", "/v1/buckets/photos/objects/a.jpg"),
    ("GET", "/v1/buckets/photos/objects"),
    ("GET", "/client/loopgate.js"),
]


async def _app(**overrides: Any) -> AsyncIterator[Quart]:
    values: dict[str, Any] = {
        "allowed_origins": ALLOWED,
        "auth": "enabled",
        "jwt_secret": JWT_SECRET,
        "buckets": "*",
    }
    values.update(overrides)
    app = create_app(make_settings(**values))
    async with app.test_app():
        yield app


@pytest.fixture
async def cors_app(pubsub_emulator: Any) -> AsyncIterator[Quart]:
    async for app in _app():
        yield app


def preflight(origin: str, method: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
    }


@pytest.mark.parametrize(("method", "path"), BROWSER_ROUTES)
async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_token(
    cors_app: Quart, method: str, path: str
) -> None:
    response = await cors_app.test_client().options(path, headers=preflight(ALLOWED, method))
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    allowed_headers = response.headers["Access-Control-Allow-Headers"].lower()
    for header in ("authorization", "content-type", "last-event-id"):
        assert header in allowed_headers
    assert method in response.headers["Access-Control-Allow-Methods"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    assert int(response.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in response.headers["Vary"]


@pytest.mark.parametrize(("method", "path"), BROWSER_ROUTES)
async def test_other_origins_get_no_cors_headers(cors_app: Quart, method: str, path: str) -> None:
    client = cors_app.test_client()
    response = await client.options(path, headers=preflight(OTHER, method))
    assert not [
        name for name in response.headers.keys() if name.lower().startswith("access-control")
    ]
    response = await client.open(path, method=method, headers={"Origin": OTHER})
    assert not [
        name for name in response.headers.keys() if name.lower().startswith("access-control")
    ]


@pytest.mark.parametrize(("method", "path"), BROWSER_ROUTES[:-1])
async def test_error_answers_carry_cors_headers(cors_app: Quart, method: str, path: str) -> None:
    """A browser reads a 401 (here: no token) as well as a success."""
    response = await cors_app.test_client().open(path, method=method, headers={"Origin": ALLOWED})
    assert response.status_code == 401
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = response.headers["Access-Control-Expose-Headers"].lower()
    for header in ("retry-after", "etag", "content-range", "www-authenticate"):
        assert header in exposed
    assert (await response.get_json())["error"]["code"] == 401


async def test_framework_errors_carry_cors_headers(cors_app: Quart) -> None:
    client = cors_app.test_client()
    missing = await client.get("/v1/nothing-here", headers={"Origin": ALLOWED})
    assert missing.status_code == 404
    assert missing.headers["Access-Control-Allow-Origin"] == ALLOWED
    wrong_method = await client.delete("/v1/topics/demo:publish", headers={"Origin": ALLOWED})
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_a_publish_from_an_allowed_origin(cors_app: Quart, topic: Topic) -> None:
    token = make_jwt([f"publish:{topic.name}"])
    response = await cors_app.test_client().post(
        f"/v1/topics/{topic.name}:publish",
        json={"messages": [{"data": base64.b64encode(b"hi").decode()}]},
        headers={"Origin": ALLOWED, **bearer(token)},
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert len((await response.get_json())["messageIds"]) == 1


async def test_a_wildcard_allows_any_origin_without_credentials(pubsub_emulator: Any) -> None:
    async for app in _app(allowed_origins="*"):
        client = app.test_client()
        response = await client.options("/v1/topics/demo:publish", headers=preflight(OTHER, "POST"))
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
        response = await client.get("/client/loopgate.js", headers={"Origin": OTHER})
        assert response.headers["Access-Control-Allow-Origin"] == "*"


async def test_no_allowed_origins_means_no_cors(pubsub_emulator: Any) -> None:
    async for app in _app(allowed_origins=""):
        response = await app.test_client().options(
            "/v1/topics/demo:publish", headers=preflight(ALLOWED, "POST")
        )
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_websockets_keep_loopgates_origin_check(pubsub_emulator: Any, topic: Topic) -> None:
    """Without Origin (not a browser) a websocket is accepted; a listed Origin too; another one
    is refused with loopgate's 403, not quart-cors's 400."""
    async for app in _app(auth="disabled"):
        client = app.test_client()
        for headers in ({}, {"Origin": ALLOWED}):
            async with client.websocket(f"/v1/topics/{topic.name}/stream", headers=headers) as ws:
                assert '"subscribed"' in await ws.receive()
        with pytest.raises(Exception) as refused:
            async with client.websocket(
                f"/v1/topics/{topic.name}/stream", headers={"Origin": OTHER}
            ) as ws:
                await ws.receive()
        assert getattr(refused.value, "response", None) is not None
        assert refused.value.response.status_code == 403  # type: ignore[attr-defined]


# -- the client file ---------------------------------------------------------------------------


async def test_the_client_file_is_served_as_javascript(cors_app: Quart) -> None:
    client = cors_app.test_client()
    response = await client.get("/client/loopgate.js", headers={"Origin": ALLOWED})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert await response.get_data() == CLIENT_FILE.read_bytes()
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    etag = response.headers["ETag"]
    assert etag.startswith('"') and not etag.startswith("W/")

    again = await client.get("/client/loopgate.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert await again.get_data() == b""
    assert again.headers["ETag"] == etag
    other = await client.get("/client/loopgate.js", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200
    head = await client.head("/client/loopgate.js")
    assert head.status_code == 200
    assert head.headers["ETag"] == etag


def test_the_client_file_is_package_data() -> None:
    """pyproject.toml installs service/web/*.js (and the console's files) with the package."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["service"]
    web = ROOT / "service" / "web"
    shipped = [
        path for path in web.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    ]
    assert CLIENT_FILE in shipped
    for path in shipped:
        relative = path.relative_to(ROOT / "service").as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative


# -- through each real server ------------------------------------------------------------------


async def test_cors_through_each_server(
    start_server: Any, server_name: str, tmp_path: Path
) -> None:
    server = await start_server(
        {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_JWT_SECRET": JWT_SECRET,
            "LOOPGATE_ALLOWED_ORIGINS": ALLOWED,
            "LOOPGATE_BUCKETS": "*",
        },
        server=server_name,
    )
    timeout = aiohttp.ClientTimeout(total=WAIT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for method, path in BROWSER_ROUTES:
            async with session.options(
                server.url + path, headers=preflight(ALLOWED, method)
            ) as response:
                assert response.status == 200, (method, path)
                assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
                assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
            async with session.options(
                server.url + path, headers=preflight(OTHER, method)
            ) as response:
                assert "Access-Control-Allow-Origin" not in response.headers
        async with session.post(
            server.url + "/v1/topics/demo:publish", json={}, headers={"Origin": ALLOWED}
        ) as response:
            assert response.status == 401
            assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        async with session.get(
            server.url + "/client/loopgate.js", headers={"Origin": ALLOWED}
        ) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/javascript; charset=utf-8"
            assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
            assert await response.read() == CLIENT_FILE.read_bytes()
