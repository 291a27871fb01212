"""Bench-only apps for ``bench/stream.py`` (never used by the service).

* ``ceiling_app()``: the loopgate service with the fan-out hub fed by a timer in the worker instead of
  Pub/Sub: the same routes, queues, coalescing and websocket writes, no Pub/Sub at all. It shows
  what one worker can deliver at best. The timer starts on ``POST /bench/start``, which the
  benchmark sends once every client is connected (as it starts publishing for the other designs):
  a timer already broadcasting while thousands of clients connect slows their handshakes until the
  client gives up on some of them.
* ``naive_app()``: the design the hub replaces: every websocket creates its own Pub/Sub subscription
  and runs its own streaming pull, at ``/naive/<topic>/stream``.

Environment: ``BENCH_TOPIC`` and ``BENCH_RATE`` (messages per second of the timer).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from google.cloud import pubsub_v1
from quart import Quart, websocket

from service import create_app
from service.clients.pubsub.specs import SUBSCRIBER
from service.clients.pubsub.streaming_pull import STREAMING, StreamingPull
from service.config import current_settings
from service.loopclients import ClientSpec
from service.streams.frames import Frame, encode_message
from service.streams.hub import FANOUT, Hub

TICK = 0.01


class TimerHub(Hub):
    """A hub whose topics are fed by :func:`_timer` instead of a Pub/Sub subscription."""

    async def _start_feed(self, feed: Any) -> None:
        return None  # no subscription, no streaming pull


async def _create_timer_hub() -> Hub:
    from service.streams.gate import GATE

    return TimerHub(current_settings(), await SUBSCRIBER.get(), None, await GATE.get())


async def _timer(hub: Hub, topic: str, rate: float, go: asyncio.Event) -> None:
    data = base64.b64encode(b"x" * 64).decode()
    loop = asyncio.get_running_loop()
    await go.wait()
    start, sent, number = loop.time(), 0, 0
    while True:
        await asyncio.sleep(TICK)
        due = int((loop.time() - start) * rate) - sent
        if due <= 0:
            continue
        now = time.time()
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        frames = []
        for _ in range(due):
            number += 1
            body = {
                "type": "message",
                "messageId": str(number),
                "data": data,
                "attributes": {},
                "orderingKey": "",
                "publishTime": stamp,
            }
            frames.append(Frame(str(number), json.dumps(body, separators=(",", ":")), now))
        hub.fanout(topic, frames)
        sent += due


def ceiling_app() -> Quart:
    app = create_app()
    loops = app.extensions["loopclients"]
    loops.specs = [
        ClientSpec("fanout", create=_create_timer_hub, close=lambda hub: hub.aclose())
        if spec.name == "fanout"
        else spec
        for spec in loops.specs
    ]
    topic, rate = os.environ["BENCH_TOPIC"], float(os.environ["BENCH_RATE"])
    go = asyncio.Event()

    @app.post("/bench/start")
    async def start() -> str:
        go.set()
        return "started"

    @app.while_serving
    async def timer() -> Any:
        registry = loops.registry_for_running_loop()
        with registry.bind():
            hub = await FANOUT.get()
        task = asyncio.get_running_loop().create_task(_timer(hub, topic, rate, go))
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return app


def naive_app() -> Quart:
    app = create_app()

    @app.websocket("/naive/<topic>/stream")
    async def naive(topic: str) -> None:
        settings = current_settings()
        admin = await SUBSCRIBER.get()
        client: pubsub_v1.SubscriberClient = await STREAMING.get()
        path = f"projects/{settings.project}/subscriptions/naive-{uuid.uuid4().hex[:12]}"
        await admin.create_subscription(name=path, topic=settings.topic_path(topic))
        queue: asyncio.Queue[str] = asyncio.Queue()

        def on_messages(messages: list[Any]) -> None:
            for message in messages:
                queue.put_nowait(encode_message(message).text)
                message.ack()

        pull = StreamingPull(client, path, on_messages, pubsub_v1.types.FlowControl())
        pull.start()
        try:
            await websocket.accept()
            await websocket.send(json.dumps({"type": "subscribed", "topic": topic}))
            while True:
                await websocket.send(await queue.get())
        finally:
            await pull.stop()
            await admin.delete_subscription(subscription=path)

    return app
