"""The app factory: accessors in every kind of handler, clients of your own, degraded start."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
from collections.abc import Iterator
from typing import Any

import pytest
import quart_schema.extension
from conftest import Topic, create_topic_at, make_settings
from pydantic import BaseModel
from quart import Quart, Response, websocket

from devtools.emulators import PubSubEmulator
from service import ClientSpec, create_app, gctune, get_http, get_publisher, malloctune


class Pool:
    """Stands for any client of your own, an asyncpg pool for one."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False

    async def fetch(self) -> str:
        return "row"

    async def close(self) -> None:
        self.closed = True


async def create_pool() -> Pool:
    return Pool()


async def close_pool(pool: Pool) -> None:
    await pool.close()


async def test_a_client_of_your_own(pubsub_emulator: Any) -> None:
    pools: list[Pool] = []

    async def create() -> Pool:
        pools.append(await create_pool())
        return pools[-1]

    DB = ClientSpec("db", create=create, close=close_pool)
    app = create_app(make_settings(), clients=[DB])

    @app.get("/rows")
    async def rows() -> dict[str, Any]:
        pool = await DB.get()
        return {"row": await pool.fetch(), "same_loop": pool.loop is asyncio.get_running_loop()}

    async with app.test_app():
        client = app.test_client()
        responses = await asyncio.gather(*(client.get("/rows") for _ in range(50)))
        assert {(await r.get_json())["same_loop"] for r in responses} == {True}
        ready = await (await client.get("/readyz")).get_json()
        assert ready["clients"]["db"] == "ok"
    assert len(pools) == 1
    assert pools[0].closed


async def test_accessors_reach_clients_from_every_kind_of_handler(pubsub_emulator: Any) -> None:
    app = create_app(make_settings())
    seen: dict[str, Any] = {}
    done = asyncio.Event()

    @app.get("/http")
    async def http_handler() -> dict[str, bool]:
        seen["http"] = await get_publisher()
        app.add_background_task(background)
        return {"ok": True}

    async def background() -> None:
        seen["background"] = await get_publisher()
        done.set()

    @app.websocket("/ws")
    async def ws_handler() -> None:
        seen["websocket"] = await get_publisher()
        seen["session"] = await get_http()
        await websocket.send("ok")

    async with app.test_app():
        client = app.test_client()
        assert (await client.get("/http")).status_code == 200
        await asyncio.wait_for(done.wait(), 10)
        async with client.websocket("/ws") as ws:
            assert await asyncio.wait_for(ws.receive(), 10) == "ok"
    assert seen["http"] is seen["background"] is seen["websocket"]
    assert seen["session"].closed


async def test_clients_are_created_at_startup_and_closed_at_shutdown(pubsub_emulator: Any) -> None:
    app = create_app(make_settings())
    loops = app.extensions["loopclients"]
    async with app.test_app():
        registry = loops.registry_for_running_loop()
        assert {"http", "publisher", "subscriber"} <= set(registry.created())
        session = registry.peek("http")
    assert session.closed
    assert registry.created() == []


@pytest.fixture
def gc_state() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.parametrize("tuning", [True, False])
async def test_garbage_collection_is_settled_after_startup(
    pubsub_emulator: Any, gc_state: None, tuning: bool
) -> None:
    gc.set_threshold(700, 10, 10)
    app = create_app(make_settings(gc_tuning=tuning))
    async with app.test_app():
        registry = app.extensions["loopclients"].registry_for_running_loop()
        publisher = registry.peek("publisher")
        if tuning:
            assert gc.get_threshold() == gctune.THRESHOLDS
            # What startup made (the clients among it) is out of the collector's way.
            assert gc.get_freeze_count() > 0
            assert not any(obj is publisher for obj in gc.get_objects())
        else:
            assert gc.get_threshold() == (700, 10, 10)
            assert any(obj is publisher for obj in gc.get_objects())


@pytest.mark.parametrize("tuning", [True, False])
async def test_the_allocator_is_settled_at_startup(
    pubsub_emulator: Any, monkeypatch: pytest.MonkeyPatch, tuning: bool
) -> None:
    # glibc's settings cannot be read back (tests/test_malloctune.py measures what they do), so
    # this checks only that startup asks for them, and only when the setting is on.
    calls: list[bool] = []
    monkeypatch.setattr(malloctune, "settle", lambda: calls.append(True) or True)
    app = create_app(make_settings(malloc_tuning=tuning))
    assert not calls
    async with app.test_app():
        assert calls == ([True] if tuning else [])


async def test_lazy_mode_creates_nothing_at_startup(pubsub_emulator: Any) -> None:
    app = create_app(make_settings(eager=False))
    async with app.test_app():
        registry = app.extensions["loopclients"].registry_for_running_loop()
        assert registry.created() == []
        response = await app.test_client().get("/readyz")
        assert response.status_code == 200
        assert {"http", "publisher", "subscriber"} <= set(registry.created())


@pytest.fixture
def emulator_down(pubsub_emulator: PubSubEmulator) -> Iterator[PubSubEmulator]:
    """A Pub/Sub emulator that is not running yet, and the environment pointing at it."""
    emulator = PubSubEmulator()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        yield emulator
    finally:
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub_emulator.host
        emulator.stop()


async def test_degraded_start_then_recovery(emulator_down: PubSubEmulator) -> None:
    settings = make_settings(client_create_timeout=0.5, backoff_initial=0.2, backoff_max=0.5)
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        body = await ready.get_json()
        assert body["error"]["status"] == "UNAVAILABLE"
        assert "publisher" in body["error"]["message"]
        assert body["clients"]["publisher"].startswith("down")
        assert body["clients"]["http"] == "ok"
        assert int(ready.headers["Retry-After"]) >= 1

        publish = await client.post(
            "/v1/topics/recovered:publish", json={"messages": [{"data": "aGk="}]}
        )
        assert publish.status_code == 503
        assert "Retry-After" in publish.headers
        assert "publisher" in (await publish.get_json())["error"]["message"]

        await asyncio.to_thread(emulator_down.start)
        create_topic_at(emulator_down.host, "recovered")
        async with asyncio.timeout(30):
            while True:
                publish = await client.post(
                    "/v1/topics/recovered:publish", json={"messages": [{"data": "aGk="}]}
                )
                if publish.status_code == 200:
                    break
                assert publish.status_code == 503
                await asyncio.sleep(float(publish.headers["Retry-After"]) / 4)
        assert (await client.get("/readyz")).status_code == 200


async def test_unexpected_errors_are_json_500(app: Quart) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise ZeroDivisionError("secret detail")

    response = await app.test_client().get("/boom")
    assert response.status_code == 500
    body = await response.get_json()
    assert body["error"]["status"] == "INTERNAL"
    assert "secret" not in body["error"]["message"]


async def test_unknown_route_and_method_are_json(app: Quart) -> None:
    client = app.test_client()
    missing = await client.get("/nope")
    assert missing.status_code == 404
    assert (await missing.get_json())["error"]["status"] == "NOT_FOUND"
    wrong = await client.get("/v1/topics/abc:publish")
    assert wrong.status_code == 405
    assert (await wrong.get_json())["error"]["code"] == 405
    assert "POST" in wrong.headers["Allow"]


async def test_a_body_that_is_not_utf8_is_400(app: Quart) -> None:
    response = await app.test_client().post(
        "/v1/topics/abc:publish", data=b"\xff\xfe{", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert (await response.get_json())["error"]["status"] == "INVALID_ARGUMENT"


class Order(BaseModel):
    order_id: str
    lines: int


@dataclasses.dataclass
class Receipt:
    order_id: str


async def test_responses_are_converted_only_when_they_hold_something_to_convert(
    app: Quart, topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    converted: list[Any] = []
    convert = quart_schema.extension.convert_response_return_value

    def counting(result: Any) -> Any:
        converted.append(result)
        return convert(result)

    monkeypatch.setattr(quart_schema.extension, "convert_response_return_value", counting)

    @app.get("/test/model")
    async def model() -> Order:
        return Order(order_id="o-1", lines=2)

    @app.get("/test/dataclass")
    async def dataclass() -> tuple[Receipt, int, dict[str, str]]:
        return Receipt(order_id="o-2"), 201, {"X_Receipt": "yes"}

    @app.get("/test/response")
    async def response() -> tuple[Response, int, dict[str, str]]:
        return Response("done"), 202, {"X-Done": "yes"}

    @app.get("/test/nested")
    async def nested() -> dict[str, Any]:
        return {"receipts": [Receipt(order_id="o-3")]}

    @app.get("/test/large")
    async def large() -> dict[str, Any]:
        return {"items": [{"name": str(i)} for i in range(300)]}

    @app.get("/test/plain")
    async def plain() -> dict[str, Any]:
        return {"status": "ok", "counts": [1, 2.5, None, True], "nested": {"a": {"b": "c"}}}

    client = app.test_client()
    answer = await client.get("/test/model")
    assert (await answer.get_json()) == {"order_id": "o-1", "lines": 2}
    answer = await client.get("/test/dataclass")
    assert answer.status_code == 201 and answer.headers["X-Receipt"] == "yes"
    assert (await answer.get_json()) == {"order_id": "o-2"}
    answer = await client.get("/test/nested")  # a dataclass inside a dict
    assert (await answer.get_json()) == {"receipts": [{"order_id": "o-3"}]}
    answer = await client.get("/test/large")  # too many values to check: left to quart-schema
    assert len((await answer.get_json())["items"]) == 300
    assert len(converted) == 4
    converted.clear()

    answer = await client.get("/test/response")
    assert answer.status_code == 202 and answer.headers["X-Done"] == "yes"
    assert (await answer.get_data()) == b"done"
    publish = await client.post(
        f"/v1/topics/{topic.name}:publish", json={"messages": [{"data": "aGk="}]}
    )
    assert publish.status_code == 200 and len((await publish.get_json())["messageIds"]) == 1
    assert (await client.get("/nope")).status_code == 404  # an error handler's answer
    assert (await client.get("/healthz")).status_code == 200  # a small plain dict
    answer = await client.get("/test/plain")
    assert (await answer.get_json()) == {
        "status": "ok",
        "counts": [1, 2.5, None, True],
        "nested": {"a": {"b": "c"}},
    }
    assert converted == []
