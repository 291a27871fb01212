"""Structured logs: JSON lines with request ids; credentials and message data never logged."""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from authkit import JWT_SECRET, bearer, make_jwt, new_token, write_tokens
from conftest import Topic
from quart import Quart

from service.logs import JsonFormatter, configure_logging, redact


def record(name: str, message: str, args: Any = None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)


def test_records_are_one_json_object_per_line() -> None:
    line = JsonFormatter().format(record("loopgate.x", "hello %s", ("world",)))
    entry = json.loads(line)
    assert entry["message"] == "hello world"
    assert entry["level"] == "INFO" and entry["logger"] == "loopgate.x"
    assert entry["time"].endswith("+00:00")
    assert "\n" not in line


def test_access_records_have_fields_and_no_query_string() -> None:
    atoms = {
        "h": "127.0.0.1:5",
        "m": "GET",
        "U": "/v1/x",
        "H": "1.1",
        "s": "401",
        "b": "9",
        "D": 12,
        "{x-request-id}o": "abc",
        "q": "access_token=secret",
        "r": "GET /v1/x 1.1",
    }
    entry = json.loads(JsonFormatter().format(record("hypercorn.access", "%(r)s", atoms)))
    assert entry["path"] == "/v1/x" and entry["status"] == "401"
    assert entry["request_id"] == "abc"
    assert "secret" not in json.dumps(entry)


@pytest.mark.parametrize(
    "secret",
    [
        "Bearer lg_abcdefghijklmnopqrstuvwxyz",
        "GET /ws?access_token=lg_abcdefghijklmnopqrstuvwxyz&x=1",
        make_jwt("a:b"),
        "token lg_abcdefghijklmnopqrstuvwxyz0123",
    ],
)
def test_credential_shaped_text_is_masked(secret: str) -> None:
    assert "abcdefghijklmnop" not in redact(secret)
    assert "[redacted]" in redact(secret)
    assert JWT_SECRET not in redact(secret)


async def test_request_ids_are_returned_and_in_every_log_line(app: Quart) -> None:
    client = app.test_client()
    made = await client.get("/healthz")
    assert len(made.headers["X-Request-ID"]) == 32
    kept = await client.get("/healthz", headers={"X-Request-ID": "edge-1234:abc"})
    assert kept.headers["X-Request-ID"] == "edge-1234:abc"
    for insane in ("a" * 200, "bad id", "x\u00e9"):
        replaced = await client.get("/healthz", headers={"X-Request-ID": insane})
        assert replaced.headers["X-Request-ID"] != insane

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("loopgate")
    logger.addHandler(handler)
    try:

        @app.get("/logs-something")
        async def something() -> str:
            logging.getLogger("loopgate.test").warning("inside the request")
            return "ok"

        response = await client.get("/logs-something", headers={"X-Request-ID": "req-42"})
    finally:
        logger.removeHandler(handler)
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert response.headers["X-Request-ID"] == "req-42"
    assert {"message": "inside the request", "request_id": "req-42"}.items() <= entries[-1].items()


def test_text_format_is_available() -> None:
    configure_logging("text", "INFO")
    try:
        handlers = [
            h
            for h in logging.getLogger("loopgate").handlers
            if getattr(h, "_loopgate_handler", False)
        ]
        assert len(handlers) == 1
        assert not isinstance(handlers[0].formatter, JsonFormatter)
    finally:
        configure_logging("json", "INFO")


async def test_real_server_logs_are_json_without_credentials_or_message_data(
    start_server: Any, tmp_path: Path, topic: Topic
) -> None:
    token, reader = new_token(), new_token()
    path = write_tokens(
        tmp_path / "tokens.toml", {"writer": (token, ["*"]), "reader": (reader, ["subscribe:*"])}
    )
    server = await start_server(
        {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": str(path),
            "LOOPGATE_JWT_SECRET": JWT_SECRET,
        },
        app="tests.wsapp:create_app()",
    )
    marker = "payload-marker-7d1f"
    data = base64.b64encode(marker.encode()).decode()
    body = {"messages": [{"data": data, "attributes": {"note": marker}}]}
    jwt = make_jwt("subscribe:orders")
    bad_jwt = jwt[:-4] + "AAAA"
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers=bearer(token)) as response:
            assert response.status == 200
            request_id = response.headers["X-Request-ID"]
        for headers in (bearer(reader), bearer(bad_jwt), {"Authorization": "Basic " + token}):
            async with session.post(url, json=body, headers=headers) as response:
                assert response.status in (401, 403)
        async with session.post(f"{url}?access_token={token}", json=body) as response:
            assert response.status == 401
        ws_base = server.url.replace("http", "ws")
        ws = await session.ws_connect(f"{ws_base}/test/orders/ws?access_token={jwt}")
        await ws.receive(timeout=30)
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"{ws_base}/test/orders/ws?access_token={bad_jwt}")
    server.stop()
    log = server.log()
    for secret in (token, reader, jwt, bad_jwt, jwt.split(".")[2], data, marker):
        assert secret not in log
    entries = [json.loads(line) for line in log.splitlines() if line.strip()]
    access = [e for e in entries if e["logger"] == "hypercorn.access"]
    assert any(e["request_id"] == request_id and e["status"] == "200" for e in access)
    assert any(e["path"] == "/test/orders/ws" for e in access)
    assert any(e.get("principal") == "reader" for e in entries)
