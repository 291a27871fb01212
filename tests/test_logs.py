"""Structured logs: JSON lines with request ids; credentials and message data never logged."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from authkit import JWT_SECRET, bearer, make_jwt, new_token, write_tokens
from conftest import WAIT, Topic, without_granian_panics
from quart import Quart

from service.logs import (
    FIELDS,
    JsonFormatter,
    configure_logging,
    init_loop_logging,
    log_loop_exception,
    redact,
)


def record(name: str, message: str, args: Any = None) -> logging.LogRecord:
    return logging.LogRecord(name, logging.INFO, __file__, 1, message, args, None)


def test_records_are_one_json_object_per_line() -> None:
    line = JsonFormatter().format(record("loopgate.x", "hello %s", ("world",)))
    entry = json.loads(line)
    assert entry["message"] == "hello world"
    assert entry["level"] == "INFO" and entry["logger"] == "loopgate.x"
    assert entry["time"].endswith("+00:00")
    assert "\n" not in line


@pytest.mark.parametrize(
    "created",
    [1764810000.0004, 1764810000.1234, 1764810000.9994, 1764810001.5, 951868799.25],
)
def test_line_times_are_iso_8601_to_the_millisecond_in_utc(created: float) -> None:
    formatter = JsonFormatter()
    # Another second first: the text of a second is kept for the lines that follow in it.
    for at in (created - 1.0, created):
        line = record("loopgate.x", "tick")
        line.created = at
        expected = datetime.datetime.fromtimestamp(at, datetime.UTC)
        assert json.loads(formatter.format(line))["time"] == expected.isoformat(
            timespec="milliseconds"
        )


def test_fields_are_redacted_only_where_credential_shaped() -> None:
    fields = {
        "remote": "127.0.0.1:5",
        "path": "/v1/buckets/b/objects/lg_abcdefghijklmnopqrstuvwxyz",
        "request_id": "Bearer lg_abcdefghijklmnopqrstuvwxyz",
        "status": "200",
        "duration_us": 12,
    }
    line = record("loopgate.access", "GET x 200")
    setattr(line, FIELDS, fields)
    entry = json.loads(JsonFormatter().format(line))
    assert "abcdefghijklmnop" not in json.dumps(entry)
    assert entry["path"] == "/v1/buckets/b/objects/[redacted]"
    assert entry["request_id"] == "Bearer [redacted]"
    assert (entry["remote"], entry["status"], entry["duration_us"]) == ("127.0.0.1:5", "200", 12)
    # A field never replaces one of the line's own.
    setattr(line, FIELDS, {"level": "forged", "logger": "x", "extra": "kept"})
    entry = json.loads(JsonFormatter().format(line))
    assert (entry["level"], entry["logger"], entry["extra"]) == ("INFO", "loopgate.access", "kept")


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
        # Case does not matter to the pattern, nor to the quick check before it.
        "BEARER LG_abcdefghijklmnopqrstuvwxyz",
        "GET /ws?ACCESS_TOKEN=lg_abcdefghijklmnopqrstuvwxyz",
        make_jwt("a:b").replace("eyJ", "EYJ", 1),
    ],
)
def test_credential_shaped_text_is_masked(secret: str) -> None:
    assert "abcdefghijklmnop" not in redact(secret).lower()
    assert "[redacted]" in redact(secret)
    assert JWT_SECRET not in redact(secret)


def test_text_without_credentials_is_unchanged() -> None:
    text = "POST /v1/topics/orders:publish 200 from 127.0.0.1:40000 Bear lg-x eyX"
    assert redact(text) is text


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
            h for h in logging.getLogger().handlers if getattr(h, "_loopgate_handler", False)
        ]
        assert len(handlers) == 1
        assert not isinstance(handlers[0].formatter, JsonFormatter)
    finally:
        configure_logging("json", "INFO")


def test_other_loggers_write_json_lines_too(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("json", "INFO")
    try:
        # asyncio's logger has no handler of its own: logging's last resort would write the
        # message and its traceback as plain lines.
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        logging.getLogger("asyncio").info("below the warning level: not written")
    finally:
        monkeypatch.undo()
        configure_logging("json", "INFO")
    [entry] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["logger"] == "asyncio"
    assert "RuntimeError: boom" in entry["exception"]


@pytest.mark.parametrize("clients_first", [True, False])
def test_google_client_logs_are_json_lines(
    monkeypatch: pytest.MonkeyPatch, clients_first: bool
) -> None:
    from google.api_core import client_logging

    google = logging.getLogger("google")
    monkeypatch.setattr(google, "propagate", True)
    monkeypatch.setattr(google, "level", logging.NOTSET)
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        # google-api-core, when its first client is made, stops the "google" loggers from
        # propagating unless they were configured before.
        if clients_first:
            client_logging.setup_logging()
        configure_logging("json", "INFO")
        if not clients_first:
            client_logging.setup_logging()
        logging.getLogger("google.cloud.pubsub_v1").warning("a client's warning")
        logging.getLogger("google.cloud.pubsub_v1").info("below the warning level: not written")
    finally:
        monkeypatch.undo()
        configure_logging("json", "INFO")
    [entry] = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["logger"] == "google.cloud.pubsub_v1"


def loop_entry(context: dict[str, Any]) -> tuple[logging.LogRecord, dict[str, Any]]:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    logger = logging.getLogger("loopgate.loop")
    logger.addHandler(handler)
    level = logging.getLogger("loopgate").level
    logging.getLogger("loopgate").setLevel(logging.DEBUG)
    try:
        loop = asyncio.new_event_loop()
        try:
            log_loop_exception(loop, context)
        finally:
            loop.close()
    finally:
        logger.removeHandler(handler)
        logging.getLogger("loopgate").setLevel(level)
    [got] = records
    line = JsonFormatter().format(got)
    assert "\n" not in line
    return got, json.loads(line)


def raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def test_loop_errors_are_logged_at_error_with_type_message_and_traceback() -> None:
    record, entry = loop_entry(
        {"message": "Exception in callback f()", "exception": raised(KeyError("k")), "handle": 1}
    )
    assert record.levelno == logging.ERROR
    assert entry["logger"] == "loopgate.loop"
    assert entry["message"] == "Exception in callback f(): KeyError: 'k'"
    assert entry["error_type"] == "KeyError" and entry["handle"] == 1
    assert entry["exception"].startswith("Traceback (most recent call last):")
    assert "raise error" in entry["exception"]

    record, entry = loop_entry({"message": "Task was destroyed but it is pending!", "task": "t"})
    assert record.levelno == logging.ERROR
    assert entry["message"] == "Task was destroyed but it is pending!" and entry["task"] == "t"


def test_a_cancelled_callback_at_shutdown_is_logged_at_debug() -> None:
    record, entry = loop_entry(
        {"message": "Exception in callback cb", "exception": raised(asyncio.CancelledError())}
    )
    assert record.levelno == logging.DEBUG
    assert entry["message"] == "Exception in callback cb: CancelledError"
    assert "CancelledError" in entry["exception"]


async def test_the_serving_loop_reports_through_the_json_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = Quart(__name__)
    init_loop_logging(app)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    called = asyncio.Event()

    def fails() -> None:
        called.set()
        raise ValueError("in a callback")

    try:
        async with app.test_app():
            assert loop.get_exception_handler() is log_loop_exception
            with caplog.at_level(logging.ERROR, logger="loopgate.loop"):
                loop.call_soon(fails)
                await asyncio.wait_for(called.wait(), WAIT)
                await asyncio.sleep(0)  # the handler runs right after the callback
    finally:
        loop.set_exception_handler(previous)
    [record] = [r for r in caplog.records if r.name == "loopgate.loop"]
    assert record.levelno == logging.ERROR
    assert "ValueError: in a callback" in record.getMessage()


ACCESS_LOGGERS = {"hypercorn": "hypercorn.access", "uvicorn": "loopgate.access"}
ACCESS_FIELDS = {"remote", "method", "path", "protocol", "status", "bytes", "duration_us"}


async def test_real_server_logs_are_json_without_credentials_or_message_data(
    start_server: Any, tmp_path: Path, topic: Topic, server_name: str
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
        server=server_name,
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
    # Granian's runtime may panic as its worker exits (emmett-framework/granian#799): not a line
    # the app writes, nor one it could format.
    lines = without_granian_panics(log) if server_name == "granian" else log.splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    logger = ACCESS_LOGGERS.get(server_name, "loopgate.access")
    access = [e for e in entries if e["logger"] == logger]
    assert all(ACCESS_FIELDS <= e.keys() for e in access), access
    assert any(e["request_id"] == request_id and e["status"] == "200" for e in access)
    assert any(e["path"] == "/test/orders/ws" and e["status"] == "101" for e in access)
    # Refused: 401, or 403 where the server has no denial responses for websockets (granian).
    assert any(e["path"] == "/test/orders/ws" and e["status"] in ("401", "403") for e in access)
    assert not any("?" in e["path"] for e in access)
    assert any(e.get("principal") == "reader" for e in entries)
