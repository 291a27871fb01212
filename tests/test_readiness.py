"""Readiness with a backend that accepts connections but does not answer.

Each test stops an emulator of its own with SIGSTOP (the session's emulators are never stopped),
expects ``/readyz`` to turn 503 naming the client while ``/healthz`` stays 200, continues it with
SIGCONT (always, in a ``finally``) and expects ``/readyz`` to turn 200 again.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
from conftest import WAIT, create_bucket, create_topic_at, make_settings

from devtools.emulators import Emulator, PubSubEmulator, StorageEmulator
from service import create_app

pytestmark = [pytest.mark.emulator]

# A probe that takes longer than this hangs: it is many times the readiness timeout the tests set,
# and shorter than the registry's own bound on a check (client_create_timeout), which is what a
# probe waited for before readiness checks had a deadline of their own.
PROBE_BOUND = 10.0
READY = {"ready_timeout": 1.0, "ready_interval": 0.2, "client_create_timeout": 30.0}

Probe = Callable[[], Awaitable[tuple[int, Any]]]


@contextmanager
def stopped(emulator: Emulator) -> Iterator[None]:
    """The emulator's process is stopped inside the block, and always continued after it."""
    assert emulator.process is not None
    pid = emulator.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def until(probe: Probe, status: int) -> Any:
    """Probe until the answer has ``status``; its body."""
    async with asyncio.timeout(WAIT):
        while True:
            async with asyncio.timeout(PROBE_BOUND):
                got, body = await probe()
            if got == status:
                return body
            await asyncio.sleep(0.1)


def client_probe(client: Any, path: str = "/readyz") -> Probe:
    async def probe() -> tuple[int, Any]:
        response = await client.get(path)
        return response.status_code, await response.get_json()

    return probe


def server_probe(session: aiohttp.ClientSession, url: str) -> Probe:
    async def probe() -> tuple[int, Any]:
        async with session.get(url) as response:
            return response.status, await response.json()

    return probe


@pytest.fixture
async def own_pubsub(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[PubSubEmulator]:
    """A Pub/Sub emulator of this test's own, and the environment pointing at it."""
    emulator = PubSubEmulator()
    await asyncio.to_thread(emulator.start)
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    try:
        yield emulator
    finally:
        await asyncio.to_thread(emulator.stop)


@pytest.fixture
async def own_storage(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[StorageEmulator]:
    """A Cloud Storage emulator of this test's own, and the environment pointing at it."""
    emulator = StorageEmulator()
    await asyncio.to_thread(emulator.start)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.url)
    try:
        yield emulator
    finally:
        await asyncio.to_thread(emulator.stop)


async def test_readyz_reports_a_hung_pubsub_then_its_recovery(own_pubsub: PubSubEmulator) -> None:
    app = create_app(make_settings(**READY))
    async with app.test_app():
        client = app.test_client()
        ready = client_probe(client)
        await until(ready, 200)
        with stopped(own_pubsub):
            body = await until(ready, 503)
            assert body["error"]["status"] == "UNAVAILABLE"
            assert "publisher" in body["error"]["message"]
            assert "ListTopics was not answered" in body["clients"]["publisher"]
            assert "ListSubscriptions was not answered" in body["clients"]["subscriber"]
            assert body["clients"]["http"] == "ok"
            assert await client_probe(client, "/healthz")() == (200, {"status": "ok"})
        body = await until(ready, 200)
        assert body["clients"]["publisher"] == body["clients"]["subscriber"] == "ok"


async def test_a_publish_waiting_too_long_makes_the_publisher_not_ready(
    own_pubsub: PubSubEmulator,
) -> None:
    await asyncio.to_thread(create_topic_at, own_pubsub.host, "stalled")
    # The publisher's readiness call would only time out; its own evidence says more, and sooner.
    settings = make_settings(
        ready_publish_stall=0.5, ready_timeout=3, ready_interval=0, client_create_timeout=30
    )
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        publisher = app.extensions["loopclients"].registry_for_running_loop().peek("publisher")
        with stopped(own_pubsub):
            publish = asyncio.create_task(
                client.post("/v1/topics/stalled:publish", json={"messages": [{"data": "aGk="}]})
            )
            async with asyncio.timeout(WAIT):
                while publisher.oldest_call_age() <= 0.5:
                    assert not publish.done()
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(PROBE_BOUND):
                status, body = await client_probe(client)()
            assert status == 503
            assert "a publish call has waited" in body["clients"]["publisher"]
            assert "ListSubscriptions was not answered" in body["clients"]["subscriber"]
        async with asyncio.timeout(WAIT):
            assert (await publish).status_code == 200  # answered once Pub/Sub answers again
        assert publisher.oldest_call_age() == 0.0
        await until(client_probe(client), 200)


async def test_readyz_reports_a_hung_storage_then_its_recovery(
    pubsub_emulator: PubSubEmulator, own_storage: StorageEmulator
) -> None:
    bucket = await asyncio.to_thread(create_bucket, own_storage)
    app = create_app(make_settings(buckets=bucket, **READY))
    async with app.test_app():
        client = app.test_client()
        ready = client_probe(client)
        await until(ready, 200)
        with stopped(own_storage):
            body = await until(ready, 503)
            assert "storage" in body["error"]["message"]
            assert body["clients"]["storage"].startswith("down: ")
            assert body["clients"]["publisher"] == "ok"
            assert await client_probe(client, "/healthz")() == (200, {"status": "ok"})
        body = await until(ready, 200)
        assert body["clients"]["storage"] == "ok"


@pytest.mark.server
async def test_a_server_reports_hung_backends_with_the_default_settings(
    start_server: Any, own_pubsub: PubSubEmulator, own_storage: StorageEmulator
) -> None:
    bucket = await asyncio.to_thread(create_bucket, own_storage)
    server = await start_server(
        {
            "PUBSUB_EMULATOR_HOST": own_pubsub.host,
            "STORAGE_EMULATOR_HOST": own_storage.url,
            "LOOPGATE_BUCKETS": bucket,
            # The registry's own bound on a check, far above the readiness timeout (2 s).
            "LOOPGATE_CLIENT_CREATE_TIMEOUT": "30",
        },
        wait="/readyz",
    )
    async with aiohttp.ClientSession() as session:
        ready = server_probe(session, f"{server.url}/readyz")
        alive = server_probe(session, f"{server.url}/healthz")
        with stopped(own_pubsub):
            body = await until(ready, 503)
            assert "publisher" in body["error"]["message"]
            assert body["clients"]["publisher"].startswith("down: ")
            assert body["clients"]["subscriber"].startswith("down: ")
            assert body["clients"]["storage"] == "ok"
            async with asyncio.timeout(PROBE_BOUND):
                assert await alive() == (200, {"status": "ok"})
        await until(ready, 200)
        with stopped(own_storage):
            body = await until(ready, 503)
            assert "storage" in body["error"]["message"]
            assert body["clients"]["publisher"] == "ok"
            async with asyncio.timeout(PROBE_BOUND):
                assert await alive() == (200, {"status": "ok"})
        await until(ready, 200)
    assert server.stop() == 0
