"""Authentication and scopes: API tokens, JWTs, websocket handshakes, Origin, reloads; through
Quart's test client and a real Hypercorn server, against the Pub/Sub emulator."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from authkit import JWT_SECRET, bearer, make_jwt, new_token, write_tokens
from conftest import WAIT, Topic, make_settings
from quart import Quart
from quart.testing.connections import WebsocketResponseError
from wsapp import add_test_stream_route

from service import SettingsError, create_app

BODY = {"messages": [{"data": base64.b64encode(b"secret-payload").decode()}]}
PUBLISHER = new_token()
READER = new_token()
ADMIN = new_token()


def token_file(tmp_path: Path) -> Path:
    return write_tokens(
        tmp_path / "tokens.toml",
        {
            "publisher": (PUBLISHER, ["publish:*", "subscribe:orders"]),
            "reader": (READER, ["subscribe:*"]),
            "admin": (ADMIN, ["*"]),
        },
    )


@pytest.fixture
async def auth_app(pubsub_emulator: Any, tmp_path: Path) -> AsyncIterator[Quart]:
    settings = make_settings(
        auth="enabled",
        auth_file=str(token_file(tmp_path)),
        jwt_secret=JWT_SECRET,
        jwt_audience="loopgate",
        allowed_origins="https://app.example.com",
        auth_reload_interval=0.1,
    )
    app = add_test_stream_route(create_app(settings))
    async with app.test_app():
        yield app


async def test_missing_credentials_are_401_with_a_challenge_and_publish_nothing(
    auth_app: Quart, topic: Topic
) -> None:
    response = await auth_app.test_client().post(f"/v1/topics/{topic.name}:publish", json=BODY)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="loopgate"'
    body = await response.get_json()
    assert body["error"]["status"] == "UNAUTHENTICATED"
    assert body["error"]["code"] == 401
    assert topic.received(0, timeout=2) == []


@pytest.mark.parametrize(
    ("header", "error"),
    [
        ("Bearer lg_not-a-known-token", "invalid_token"),
        ("Basic dXNlcjpwYXNz", "invalid_request"),
        ("Bearer ", "invalid_request"),
    ],
)
async def test_bad_credentials_are_401(auth_app: Quart, header: str, error: str) -> None:
    response = await auth_app.test_client().post(
        "/v1/topics/orders:publish", json=BODY, headers={"Authorization": header}
    )
    assert response.status_code == 401
    assert f'error="{error}"' in response.headers["WWW-Authenticate"]
    assert (await response.get_json())["error"]["status"] == "UNAUTHENTICATED"


async def test_scopes_decide_and_403_names_the_missing_scope(auth_app: Quart, topic: Topic) -> None:
    client = auth_app.test_client()
    url = f"/v1/topics/{topic.name}:publish"
    denied = await client.post(url, json=BODY, headers=bearer(READER))
    assert denied.status_code == 403
    assert (await denied.get_json())["error"]["status"] == "PERMISSION_DENIED"
    assert "insufficient_scope" in denied.headers["WWW-Authenticate"]
    assert f"publish:{topic.name}" in (await denied.get_json())["error"]["message"]
    for token in (PUBLISHER, ADMIN):
        allowed = await client.post(url, json=BODY, headers=bearer(token))
        assert allowed.status_code == 200, await allowed.get_json()
    assert len(topic.received(2)) == 2


async def test_the_query_string_token_is_for_streams_only(auth_app: Quart) -> None:
    response = await auth_app.test_client().post(
        f"/v1/topics/orders:publish?access_token={PUBLISHER}", json=BODY
    )
    assert response.status_code == 401
    assert "streams only" in (await response.get_json())["error"]["message"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (make_jwt("publish:orders", aud="loopgate", ttl=-120), "expired"),
        (make_jwt("publish:orders", aud="loopgate", ttl=None), "missing claim 'exp'"),
        (make_jwt("publish:orders", aud="someone-else"), "wrong audience"),
        (make_jwt("publish:orders"), "missing claim 'aud'"),
        (make_jwt("publish:orders", aud="loopgate", key="x" * 40), "bad signature"),
        (make_jwt("publish:orders", aud="loopgate", ttl=10 * 86400), "longest lifetime"),
    ],
)
async def test_invalid_jwts_are_401(auth_app: Quart, token: str, reason: str) -> None:
    response = await auth_app.test_client().post(
        "/v1/topics/orders:publish", json=BODY, headers=bearer(token)
    )
    assert response.status_code == 401
    assert reason in (await response.get_json())["error"]["message"]
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_jwt_scopes_grant_publish(auth_app: Quart, topic: Topic) -> None:
    client = auth_app.test_client()
    url = f"/v1/topics/{topic.name}:publish"
    good = make_jwt(f"subscribe:x publish:{topic.name}", aud="loopgate")
    assert (await client.post(url, json=BODY, headers=bearer(good))).status_code == 200
    other = make_jwt("publish:other-topic", aud="loopgate")
    assert (await client.post(url, json=BODY, headers=bearer(other))).status_code == 403
    assert len(topic.received(1)) == 1


async def test_websocket_is_refused_at_the_handshake_with_http_401_and_403(
    auth_app: Quart,
) -> None:
    client = auth_app.test_client()
    cases: list[tuple[str, dict[str, str], int]] = [
        ("/test/orders/ws", {}, 401),
        ("/test/orders/ws?access_token=lg_wrong-token-of-some-length", {}, 401),
        ("/test/secret/ws", bearer(PUBLISHER), 403),  # publisher may subscribe to orders only
        ("/test/orders/ws", {**bearer(ADMIN), "Origin": "https://evil.example"}, 403),
    ]
    for path, headers, status in cases:
        with pytest.raises(WebsocketResponseError) as refused:
            async with client.websocket(path, headers=headers) as ws:
                await asyncio.wait_for(ws.receive(), WAIT)
        assert refused.value.response.status_code == status, path
        assert "X-Request-ID" in refused.value.response.headers


async def test_websocket_accepts_a_token_in_the_query_or_header_from_an_allowed_origin(
    auth_app: Quart,
) -> None:
    client = auth_app.test_client()
    async with client.websocket(f"/test/orders/ws?access_token={PUBLISHER}") as ws:
        assert await asyncio.wait_for(ws.receive(), WAIT) == "publisher on orders"
    jwt = make_jwt(["subscribe:news"], claim="scope", aud="loopgate")
    headers = {**bearer(jwt), "Origin": "https://app.example.com"}
    async with client.websocket("/test/news/ws", headers=headers) as ws:
        assert await asyncio.wait_for(ws.receive(), WAIT) == "jwt:browser-user on news"


def test_auth_on_without_anything_to_authenticate_with_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="LOOPGATE_AUTH=disabled"):
        create_app(make_settings(auth="enabled"))


def test_a_broken_token_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[token]]\nname = "x"\nsha256 = "not-hex"\n')
    with pytest.raises(SettingsError, match="sha256"):
        create_app(make_settings(auth="enabled", auth_file=str(path)))
    with pytest.raises(SettingsError, match="cannot read"):
        create_app(make_settings(auth="enabled", auth_file=str(tmp_path / "missing.toml")))


async def test_disabled_auth_warns_at_startup(
    pubsub_emulator: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(make_settings(auth="disabled", eager=False))
    with caplog.at_level(logging.WARNING, logger="loopgate"):
        async with app.test_app():
            pass
    assert any("authentication is DISABLED" in r.getMessage() for r in caplog.records)


async def test_token_file_changes_apply_without_a_restart(
    auth_app: Quart, tmp_path: Path, topic: Topic, caplog: pytest.LogCaptureFixture
) -> None:
    client = auth_app.test_client()
    url = f"/v1/topics/{topic.name}:publish"
    fresh = new_token()
    assert (await client.post(url, json=BODY, headers=bearer(fresh))).status_code == 401
    write_tokens(tmp_path / "tokens.toml", {"fresh": (fresh, [f"publish:{topic.name}"])})
    async with asyncio.timeout(WAIT):
        while True:
            if (await client.post(url, json=BODY, headers=bearer(fresh))).status_code == 200:
                break
            await asyncio.sleep(0.05)
    # The old tokens are gone with the old file.
    assert (await client.post(url, json=BODY, headers=bearer(PUBLISHER))).status_code == 401
    # A broken file keeps the tokens in force.
    with caplog.at_level(logging.ERROR, logger="loopgate.auth"):
        (tmp_path / "tokens.toml").write_text("not toml [")
        async with asyncio.timeout(WAIT):
            while True:
                if any("keeping the 1 tokens" in r.getMessage() for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
    assert (await client.post(url, json=BODY, headers=bearer(fresh))).status_code == 200


def worker_pids(master: int) -> list[int]:
    """Hypercorn's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


async def test_real_server_authenticates_reloads_on_sighup_and_refuses_websockets(
    start_server: Any, tmp_path: Path, topic: Topic
) -> None:
    path = token_file(tmp_path)
    server = await start_server(
        {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": str(path),
            "LOOPGATE_AUTH_RELOAD_INTERVAL": "0",  # SIGHUP only
        }
    )
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    fresh = new_token()
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=BODY) as response:
            assert response.status == 401
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert response.headers["X-Request-ID"]
        async with session.post(url, json=BODY, headers=bearer(READER)) as response:
            assert response.status == 403
        async with session.post(url, json=BODY, headers=bearer(PUBLISHER)) as response:
            assert response.status == 200
        async with session.post(url, json=BODY, headers=bearer(fresh)) as response:
            assert response.status == 401

        write_tokens(path, {"fresh": (fresh, ["publish:*"])})
        (worker,) = worker_pids(server.process.pid)
        os.kill(worker, signal.SIGHUP)
        async with asyncio.timeout(WAIT):
            while True:
                async with session.post(url, json=BODY, headers=bearer(fresh)) as response:
                    if response.status == 200:
                        break
                    assert response.status == 401
                await asyncio.sleep(0.05)
        assert worker_pids(server.process.pid) == [worker]  # SIGHUP did not end the worker
    assert len(topic.received(2)) == 2


async def test_real_server_refuses_websockets_with_http_status_at_the_handshake(
    start_server: Any, tmp_path: Path
) -> None:
    server = await start_server(
        {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": str(token_file(tmp_path)),
            "LOOPGATE_ALLOWED_ORIGINS": "https://app.example.com",
        },
        app="tests.wsapp:create_app()",
    )
    base = server.url.replace("http", "ws")
    async with aiohttp.ClientSession() as session:
        for path, headers, status in [
            ("/test/orders/ws", {}, 401),
            ("/test/secret/ws", bearer(PUBLISHER), 403),
            ("/test/orders/ws", {**bearer(PUBLISHER), "Origin": "https://evil.example"}, 403),
        ]:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(base + path, headers=headers)
            assert refused.value.status == status, path
            assert refused.value.headers is not None
            assert refused.value.headers.get("X-Request-ID")
        ws = await session.ws_connect(
            f"{base}/test/orders/ws?access_token={PUBLISHER}",
            headers={"Origin": "https://app.example.com"},
        )
        message = await ws.receive(timeout=WAIT)
        assert message.data == "publisher on orders"
        await ws.close()
