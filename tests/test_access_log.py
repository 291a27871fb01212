"""Hypercorn's access log with atoms computed when read: the same atoms and lines as Hypercorn's."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import ROOT, WAIT
from hypercorn.asyncio.statsd import StatsdLogger
from hypercorn.config import Config
from hypercorn.logging import AccessLogAtoms as HypercornAtoms
from hypercorn.logging import Logger

from service.logs import JsonFormatter
from service.server.hypercorn import access_log
from service.server.hypercorn.access_log import AccessLogAtoms, AccessLogger

FORMAT = Config.from_toml(ROOT / "hypercorn.toml").access_log_format
LOOKUPS = [
    "{X-Request-ID}o",
    "{x-request-id}o",
    "{Content-Length}O",
    "{HOST}i",
    "{x-twice}i",
    "{LOOPGATE_ATOMS_PROBE}e",
    "{loopgate_atoms_probe}e",
    "{absent}i",
    "{absent}o",
    "{absent}e",
    "{absent}x",
    "absent",
    "",
]


def http_request(query: bytes = b"access_token=secret&x=1") -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/topics/orders:publish",
        "query_string": query,
        "headers": [
            (b"Host", b"loopgate"),
            (b"User-Agent", b"wrk"),
            (b"Referer", b"http://example.test/"),
            (b"X-Twice", b"first"),
            (b"x-twice", b"second"),
        ],
        "client": ("127.0.0.1", 40000),
    }


def response(status: int = 200) -> dict[str, Any]:
    return {
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"27"),
            (b"X-Request-ID", b"req-1"),
        ],
    }


def cases() -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
    websocket = {**http_request(b""), "type": "websocket"}
    del websocket["http_version"]
    unix = {**http_request(), "client": ("/run/loopgate.sock",)}
    return [
        (http_request(), response()),
        (http_request(b""), response(599)),
        (http_request(), None),
        (websocket, response(101)),
        ({**http_request(), "client": None}, response(404)),
        (unix, response()),
    ]


def test_atoms_are_hypercorns_for_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOPGATE_ATOMS_PROBE", "probe")
    for request, answer in cases():
        theirs = HypercornAtoms(request, answer, 0.0123456)  # type: ignore[arg-type]
        ours = AccessLogAtoms(request, answer, 0.0123456)  # type: ignore[arg-type]
        assert set(ours) == set(theirs) and len(ours) == len(theirs)
        for key in [*theirs, *LOOKUPS]:
            if key == "t":  # the time of the line, read a moment apart
                continue
            assert ours[key] == theirs[key], key
            assert (key in ours) == (key in theirs), key
            assert ours.get(key) == theirs.get(key), key
        assert re.fullmatch(r"\[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\]", ours["t"])
        assert ours["t"] in (theirs["t"], time.strftime("[%d/%b/%Y:%H:%M:%S %z]"))
        assert ours["{loopgate_atoms_probe}e"] == "probe"


def test_json_and_text_lines_are_hypercorns() -> None:
    lines = []
    for atoms_class in (HypercornAtoms, AccessLogAtoms):
        atoms = atoms_class(http_request(), response(), 0.0123456)  # type: ignore[arg-type]
        record = logging.LogRecord(
            "hypercorn.access", logging.INFO, __file__, 1, FORMAT, (atoms,), None
        )
        entry = json.loads(JsonFormatter().format(record))
        del entry["time"]
        lines.append((entry, record.getMessage()))
    assert lines[0] == lines[1]
    entry, text = lines[1]
    assert entry["request_id"] == "req-1" and entry["duration_us"] == 12345
    assert "secret" not in json.dumps(entry) and "secret" not in text


def test_hypercorn_configs_get_the_access_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Config, "logger_class", Logger)
    access_log.use_lean_atoms()
    assert Config.logger_class is AccessLogger
    logger = Config.from_toml(ROOT / "hypercorn.toml").log
    assert type(logger) is AccessLogger
    assert isinstance(logger.atoms(http_request(), response(), 0.1), AccessLogAtoms)  # type: ignore[arg-type]


def test_a_logger_class_of_your_own_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    class Mine(Logger):
        pass

    monkeypatch.setattr(Config, "logger_class", Mine)
    access_log.use_lean_atoms()
    assert Config.logger_class is Mine


def test_statsd_logging_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Config, "logger_class", Logger)
    access_log.use_lean_atoms()
    config = Config()
    config.statsd_host = "127.0.0.1:8125"
    config.set_statsd_logger_class(StatsdLogger)  # what a Hypercorn worker does before logging
    logger = config.log
    assert isinstance(logger, StatsdLogger) and isinstance(logger, AccessLogger)
    assert isinstance(logger.atoms(http_request(), response(), 0.1), AccessLogAtoms)  # type: ignore[arg-type]


async def test_real_workers_log_with_these_atoms(start_server: Any, tmp_path: Path) -> None:
    # A logging config that shows which atoms an access line was given (the start of their repr).
    logging_config = tmp_path / "logging.toml"
    logging_config.write_text(
        "version = 1\ndisable_existing_loggers = false\n"
        '[formatters.atoms]\nformat = "ACCESS-ATOMS %(args).40r"\n'
        '[handlers.access]\nclass = "logging.StreamHandler"\nformatter = "atoms"\n'
        'stream = "ext://sys.stdout"\n'
        '[loggers."hypercorn.access"]\nhandlers = ["access"]\nlevel = "INFO"\npropagate = false\n'
    )
    server = await start_server(args=["--log-config", f"toml:{logging_config}"])
    async with aiohttp.ClientSession() as session:
        async with session.get(server.url + "/healthz") as answer:
            assert answer.status == 200
    deadline = time.monotonic() + WAIT
    while "ACCESS-ATOMS" not in server.log() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    lines = [line for line in server.log().splitlines() if line.startswith("ACCESS-ATOMS")]
    assert lines, server.log()
    assert all(line.startswith("ACCESS-ATOMS <loopgate access atoms") for line in lines), lines
