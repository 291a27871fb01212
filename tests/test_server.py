"""Through a real Hypercorn server on loopback, with the repository's hypercorn.toml."""

from __future__ import annotations

import asyncio
import base64
import signal
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import (
    ROOT,
    WAIT,
    Topic,
    clean_exits,
    create_topic_at,
    metric_value,
    spawn_server,
    wait_until_up,
)
from hypercorn.config import Config

from devtools.emulators import PubSubEmulator

pytestmark = pytest.mark.server

BODY = {"messages": [{"data": base64.b64encode(b"race").decode()}]}


async def test_racing_requests_on_a_cold_worker_create_the_publisher_once(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    server = await start_server({"LOOPGATE_EAGER": "0"}, server=server_name)
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        before = await (await session.get(f"{server.url}/metrics")).text()
        assert metric_value(before, "loopgate_client_creations_total", client="publisher") == 0

        async def post() -> int:
            async with session.post(url, json=BODY) as response:
                await response.read()
                return response.status

        async with asyncio.timeout(120):
            statuses = await asyncio.gather(*(post() for _ in range(2000)))
        text = await (await session.get(f"{server.url}/metrics")).text()
    assert statuses.count(200) == 2000, {s: statuses.count(s) for s in set(statuses)}
    assert metric_value(text, "loopgate_client_creations_total", client="publisher") == 1
    assert metric_value(text, "loopgate_client_creation_failures_total", client="publisher") == 0
    assert metric_value(text, "loopgate_publish_messages_total") == 2000
    assert len(topic.received(2000)) == 2000


async def test_emulator_down_at_startup_degrades_then_recovers(
    start_server: Any, admin: Any, server_name: str
) -> None:
    emulator = PubSubEmulator()  # not started yet: its port refuses connections
    try:
        server = await start_server(
            {
                "PUBSUB_EMULATOR_HOST": emulator.host,
                "LOOPGATE_CLIENT_CREATE_TIMEOUT": "0.5",
                "LOOPGATE_BACKOFF_INITIAL": "0.2",
                "LOOPGATE_BACKOFF_MAX": "1",
            },
            server=server_name,
        )
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/readyz") as response:
                assert response.status == 503
                body = await response.json()
                assert "publisher" in body["error"]["message"]
                assert "Retry-After" in response.headers
            url = f"{server.url}/v1/topics/later:publish"
            async with session.post(url, json=BODY) as response:
                assert response.status == 503
                assert int(response.headers["Retry-After"]) >= 1

            await asyncio.to_thread(emulator.start)
            create_topic_at(emulator.host, "later")
            async with asyncio.timeout(WAIT):
                while True:
                    async with session.post(url, json=BODY) as response:
                        if response.status == 200:
                            break
                        assert response.status == 503, await response.text()
                    await asyncio.sleep(0.1)
            async with session.get(f"{server.url}/readyz") as response:
                assert response.status == 200
        assert server.stop() in clean_exits(server_name), server.log()
    finally:
        emulator.stop()


async def test_sigterm_mid_traffic_loses_no_answered_publish(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    server = await start_server(workers=2, server=server_name)
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    answered: list[str] = []
    some_answered = asyncio.Event()

    async def post(session: aiohttp.ClientSession, i: int) -> None:
        body = {"messages": [{"data": base64.b64encode(b"%d" % i).decode()}]}
        try:
            async with session.post(url, json=body) as response:
                if response.status == 200:
                    answered.extend((await response.json())["messageIds"])
                    if len(answered) >= 50:
                        some_answered.set()
                else:
                    assert response.status == 503, await response.text()
        except aiohttp.ClientError:
            pass  # refused or cut by the shutdown: not answered, so not promised

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(post(session, i)) for i in range(600)]
        await asyncio.wait_for(some_answered.wait(), WAIT)
        server.process.send_signal(signal.SIGTERM)  # while the rest are in flight
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*tasks)
    code = await asyncio.to_thread(server.process.wait, WAIT)
    assert code in clean_exits(server_name, workers=2), server.log()
    received = {m.message_id for m in topic.received(len(answered))}
    assert set(answered) <= received


async def test_bad_setting_stops_startup_with_its_name(
    tmp_path: Path, pubsub_emulator: Any
) -> None:
    server = spawn_server(tmp_path, {"LOOPGATE_TOPICS_ALLOWED": "x"})
    try:
        # The server stops by itself (Hypercorn's master exits 0 even when its worker failed,
        # so the exit code says nothing; the log names the variable).
        await asyncio.to_thread(server.process.wait, WAIT)
    finally:
        server.stop()
    assert "unknown setting LOOPGATE_TOPICS_ALLOWED" in server.log()


def test_hypercorn_toml_has_only_known_keys() -> None:
    path = ROOT / "hypercorn.toml"
    data = tomllib.loads(path.read_text())
    known = {name for name in dir(Config) if not name.startswith("_")}
    unknown = set(data) - known
    assert not unknown, f"hypercorn.toml has keys Hypercorn does not know: {unknown}"
    config = Config.from_toml(path)
    assert config.worker_class == "uvloop"
    assert config.graceful_timeout > 0
    assert config.keep_alive_timeout > 0
    assert config.accesslog is not None
    # Hypercorn closes a connection whose client sends nothing for read_timeout seconds: that
    # would cut off websocket and SSE subscribers, which only receive, and long downloads.
    assert config.read_timeout is None


async def test_wait_until_up_notices_a_dead_server(tmp_path: Path, pubsub_emulator: Any) -> None:
    server = spawn_server(tmp_path, {"LOOPGATE_PROJECT": ""})
    with pytest.raises(AssertionError, match="exited"):
        await wait_until_up(server, timeout=WAIT)
    server.stop()


async def test_metrics_are_summed_over_workers(
    start_server: Any, topic: Topic, server_name: str
) -> None:
    server = await start_server(workers=2, server=server_name)
    url = f"{server.url}/v1/topics/{topic.name}:publish"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def post() -> int:
            async with session.post(url, json=BODY) as response:
                await response.read()
                return response.status

        async with asyncio.timeout(WAIT):
            statuses = await asyncio.gather(*(post() for _ in range(400)))
        text = await (await session.get(f"{server.url}/metrics")).text()
    assert statuses == [200] * 400
    assert metric_value(text, "loopgate_publish_messages_total") == 400
    # One publisher per worker, each created once at startup.
    assert metric_value(text, "loopgate_client_creations_total", client="publisher") == 2
