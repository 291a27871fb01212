"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from conftest import WAIT, Topic, make_settings, metric_value

from service import create_app
from service.loopclients import ClientSpec


async def test_healthz(client: Any) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert await response.get_json() == {"status": "ok"}


async def test_readyz_lists_every_eager_client(client: Any) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    body = await response.get_json()
    assert body["status"] == "ready"
    assert body["clients"] == {
        "http": "ok",
        "publisher": "ok",
        "subscriber": "ok",
        "connection-gate": "ok",
        "fanout": "ok",
        "storage": "ok",
    }


async def test_metrics_count_publishes(client: Any, topic: Topic) -> None:
    before = (await (await client.get("/metrics")).get_data()).decode()
    response = await client.post(
        f"/v1/topics/{topic.name}:publish",
        json={"messages": [{"data": base64.b64encode(b"m").decode()}] * 3},
    )
    assert response.status_code == 200
    after_response = await client.get("/metrics")
    assert after_response.headers["Content-Type"].startswith("text/plain")
    after = (await after_response.get_data()).decode()
    assert (
        metric_value(after, "loopgate_publish_messages_total")
        - metric_value(before, "loopgate_publish_messages_total")
        == 3
    )
    assert (
        metric_value(after, "loopgate_publish_requests_total", outcome="ok")
        - metric_value(before, "loopgate_publish_requests_total", outcome="ok")
        == 1
    )
    assert metric_value(after, "loopgate_client_creations_total", client="publisher") >= 1
    assert "loopgate_publish_latency_seconds_bucket" in after
    assert "loopgate_publish_batch_messages_bucket" in after
    assert "loopgate_publish_pending_messages" in after


def counted_client(name: str) -> tuple[ClientSpec[object], dict[str, Any]]:
    """A client whose check counts its runs, waits for ``state["release"]`` and fails while
    ``state["fail"]`` is set."""
    state: dict[str, Any] = {"runs": 0, "release": asyncio.Event(), "fail": False}

    async def create() -> object:
        return object()

    async def check(_: object) -> None:
        state["runs"] += 1
        await state["release"].wait()
        if state["fail"]:
            raise ConnectionError("the backend said no")

    return ClientSpec(name, create=create, check=check), state


async def test_readyz_checks_a_client_once_per_interval(pubsub_emulator: Any) -> None:
    spec, state = counted_client("db")
    app = create_app(make_settings(ready_interval=3600), clients=[spec])
    async with app.test_app():
        client = app.test_client()
        probes = [asyncio.create_task(client.get("/readyz")) for _ in range(20)]
        async with asyncio.timeout(WAIT):
            while state["runs"] == 0:
                await asyncio.sleep(0.01)
        state["release"].set()
        responses = await asyncio.wait_for(asyncio.gather(*probes), WAIT)
        assert [response.status_code for response in responses] == [200] * 20
        state["fail"] = True  # not seen: the outcome is reused for the interval
        for _ in range(5):
            assert (await client.get("/readyz")).status_code == 200
    assert state["runs"] == 1


async def test_readyz_reuses_a_failed_check_and_checks_again_after_the_interval(
    pubsub_emulator: Any,
) -> None:
    for interval, runs in [(3600.0, 1), (0.0, 3)]:
        spec, state = counted_client("db")
        state["release"].set()
        state["fail"] = True
        app = create_app(make_settings(ready_interval=interval), clients=[spec])
        async with app.test_app():
            client = app.test_client()
            for _ in range(3):
                response = await client.get("/readyz")
                assert response.status_code == 503
                body = await response.get_json()
                assert body["clients"]["db"] == "down: ConnectionError: the backend said no"
                assert "db" in body["error"]["message"]
                assert int(response.headers["Retry-After"]) >= 1
        assert state["runs"] == runs, interval
