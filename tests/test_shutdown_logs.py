"""Through a real Hypercorn server: every line the service writes while it shuts down is JSON."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
from typing import Any

import aiohttp
import pytest
from conftest import (
    GRANIAN_GRACE,
    WAIT,
    Server,
    Topic,
    clean_exits,
    graceful_timeout,
    granian_killed_a_late_worker,
    metric_value,
    websocket_handshake,
    without_granian_panics,
)

pytestmark = [pytest.mark.server, pytest.mark.emulator]


async def drops(session: aiohttp.ClientSession, server: Server, topic: str) -> float:
    async with session.get(f"{server.url}/metrics") as response:
        text = await response.text()
    return metric_value(text, "loopgate_stream_drops_total", topic=topic, reason="dropped")


async def test_sigterm_with_a_subscriber_that_reads_nothing_logs_only_json(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    # The subscriber's connection is still writing when Hypercorn cancels it at the graceful
    # timeout; the cancelled connection used to end in the event loop's own plain-text traceback.
    server = await start_server(
        {"LOOPGATE_STREAM_QUEUE_SIZE": "100", "LOOPGATE_LOG_LEVEL": "DEBUG"},
        args=graceful_timeout(server_name, 2),
        server=server_name,
    )
    subscriber = socket.socket()
    subscriber.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    subscriber.setblocking(False)
    try:
        await asyncio.wait_for(
            asyncio.get_running_loop().sock_connect(subscriber, ("127.0.0.1", server.port)), WAIT
        )
        path = f"/v1/topics/{topic.name}/stream"
        await asyncio.get_running_loop().sock_sendall(subscriber, websocket_handshake(path))
        # and never reads
        data = base64.b64encode(b"x" * 64 * 1024).decode()
        body = {"messages": [{"data": data}] * 8}
        url = f"{server.url}/v1/topics/{topic.name}:publish"
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(WAIT):
                while await drops(session, server, topic.name) < 100:
                    async with session.post(url, json=body) as response:
                        assert response.status == 200, await response.text()
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.wait, WAIT)
    finally:
        subscriber.close()
    log = server.log()
    assert code in clean_exits(server_name), log
    if server_name == "hypercorn":
        assert "reset" in log  # the connection was cut while it was still writing
    assert not granian_killed_a_late_worker(log, GRANIAN_GRACE), log
    entries = []
    for line in without_granian_panics(log) if server_name == "granian" else log.splitlines():
        if line.strip():
            try:
                entries.append(json.loads(line))
            except ValueError:
                raise AssertionError(f"not a JSON line: {line!r}\n{log}") from None
    # What the loop reports about the cancelled connection is expected noise, not an error.
    assert not [e for e in entries if e["logger"] == "loopgate.loop" and e["level"] == "ERROR"]


def test_a_granian_kill_counts_only_at_its_timeout() -> None:
    def log(kill_at: str) -> str:
        lines = [
            ("03:17:19.795", "Shutting down granian"),
            ("03:17:24.797", "Stopping worker-1"),
            (kill_at, "Killing worker-1 after it refused to gracefully stop"),
        ]
        return "\n".join(
            json.dumps({"time": f"2026-12-04T{at}+00:00", "message": message})
            for at, message in lines
        )

    assert not granian_killed_a_late_worker(log("03:17:24.811"), 8)  # the exit race
    assert granian_killed_a_late_worker(log("03:17:27.801"), 8)  # the timeout
    assert not granian_killed_a_late_worker("no kill at all", 8)
