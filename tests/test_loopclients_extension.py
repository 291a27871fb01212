"""The Quart extension: a plain Quart app with per-loop clients, and nothing else of loopgate."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest
from quart import Quart, websocket

import service.loopclients
from service.loopclients import (
    ClientSpec,
    ClientUnavailable,
    LoopClients,
    Registry,
    current_registry,
)
from service.loopclients.context import _cv_registry


class Thing:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.closed = False


def thing_spec(
    name: str = "thing", log: list[str] | None = None
) -> tuple[ClientSpec[Thing], list[int]]:
    made: list[int] = []

    async def create() -> Thing:
        made.append(1)
        await asyncio.sleep(0.01)  # widen the race window
        return Thing()

    async def close(thing: Thing) -> None:
        thing.closed = True
        if log is not None:
            log.append(name)

    return ClientSpec(name, create=create, close=close), made


async def test_requests_websockets_and_background_tasks_reach_one_instance() -> None:
    spec, made = thing_spec()
    app = Quart(__name__)
    LoopClients([spec], eager=False).init_app(app)
    seen: list[Thing] = []
    background_done = asyncio.Event()

    @app.get("/")
    async def index() -> str:
        seen.append(await spec.get())

        async def later() -> None:
            seen.append(await spec.get())
            background_done.set()

        app.add_background_task(later)
        return "ok"

    @app.websocket("/ws")
    async def ws() -> None:
        seen.append(await spec.get())
        await websocket.send("ok")

    async with app.test_app():
        client = app.test_client()
        answers = await asyncio.wait_for(asyncio.gather(*(client.get("/") for _ in range(50))), 10)
        assert {answer.status_code for answer in answers} == {200}
        async with client.websocket("/ws") as connection:
            assert await asyncio.wait_for(connection.receive(), 10) == "ok"
        await asyncio.wait_for(background_done.wait(), 10)
        thing = seen[0]
    assert len(made) == 1
    assert {id(item) for item in seen} == {id(thing)}
    assert len(seen) >= 52
    assert thing.loop is asyncio.get_running_loop()
    assert thing.closed


async def test_eager_clients_are_made_at_startup_and_closed_in_reverse_order() -> None:
    closed: list[str] = []
    first, _ = thing_spec("first", closed)
    second, _ = thing_spec("second", closed)
    app = Quart(__name__)
    clients = LoopClients([first, second], app)
    async with app.test_app():
        assert sorted(clients.registry_for_running_loop().created()) == ["first", "second"]
        order = clients.registry_for_running_loop().created()
    assert closed == list(reversed(order))


async def test_a_failing_client_starts_the_app_degraded_and_recovers() -> None:
    healthy = asyncio.Event()

    async def create() -> Thing:
        if not healthy.is_set():
            raise ConnectionError("backend down")
        return Thing()

    spec = ClientSpec("flaky", create=create)
    app = Quart(__name__)
    LoopClients([spec], app, backoff_initial=0.05, backoff_max=0.05)

    @app.get("/")
    async def index() -> str:
        await spec.get()
        return "ok"

    @app.errorhandler(ClientUnavailable)
    async def unavailable(error: ClientUnavailable) -> tuple[str, int]:
        return error.message, 503

    async with app.test_app():
        client = app.test_client()
        refused = await client.get("/")
        assert refused.status_code == 503
        assert "backend down" in await refused.get_data(as_text=True)
        healthy.set()
        async with asyncio.timeout(10):
            while (await client.get("/")).status_code != 200:
                await asyncio.sleep(0.05)


async def test_handlers_find_their_loops_registry_without_binding_it() -> None:
    spec, _ = thing_spec()
    app = Quart(__name__)
    clients = LoopClients([spec], app, eager=False)
    seen: list[Any] = []

    @app.get("/")
    async def index() -> str:
        seen.append((current_registry(), _cv_registry.get(None)))
        return "ok"

    async with app.test_app():
        assert (await app.test_client().get("/")).status_code == 200
        assert seen == [(clients.registry_for_running_loop(), None)]


async def test_bind_sets_the_registry_and_resets_it() -> None:
    spec, _ = thing_spec()
    registry = Registry([spec])
    assert _cv_registry.get(None) is None
    with registry.bind():
        assert current_registry() is registry
        await spec.get()
    assert _cv_registry.get(None) is None
    await registry.aclose()


def test_binding_twice_is_refused() -> None:
    app = Quart(__name__)
    LoopClients().init_app(app)
    with pytest.raises(RuntimeError, match="already bound"):
        LoopClients().init_app(app)


def test_the_extension_imports_nothing_of_the_gateway() -> None:
    package = Path(service.loopclients.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports {'.' * node.level}{node.module}"
                assert not (node.module or "").startswith("service"), path.name
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("service") for alias in node.names), path.name
