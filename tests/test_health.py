"""Liveness, readiness and metrics."""

from __future__ import annotations

import base64
from typing import Any

from conftest import Topic, metric_value


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
