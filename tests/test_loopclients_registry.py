"""The per-event-loop registry: exactly-once creation, backoff, loops, close order.

These tests use :mod:`service.loopclients` alone, as an app without the rest of loopgate would.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import run_in_thread
from quart import Quart

from service.loopclients import (
    ClientSpec,
    ClientUnavailable,
    ForeignLoopError,
    LoopClients,
    Registry,
    current_registry,
    has_registry,
)

FAST: dict[str, Any] = {"backoff_initial": 0.2, "backoff_max": 0.4, "create_timeout": 2}


class Thing:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False


def counting_spec(name: str = "thing", *, delay: float = 0.0, close_log: list[str] | None = None):
    calls: list[int] = []

    async def create() -> Thing:
        calls.append(1)
        await asyncio.sleep(delay)  # a slow factory widens the race window
        return Thing(name)

    async def close(thing: Thing) -> None:
        thing.closed = True
        if close_log is not None:
            close_log.append(name)

    return ClientSpec(name, create=create, close=close), calls


async def test_racing_callers_create_once() -> None:
    spec, calls = counting_spec(delay=0.05)
    registry = Registry([spec], **FAST)
    with registry.bind():
        results = await asyncio.wait_for(
            asyncio.gather(*(spec.get() for _ in range(2000))), timeout=30
        )
    assert len(calls) == 1
    assert len({id(thing) for thing in results}) == 1
    await registry.aclose()


async def test_failed_creation_is_not_cached_and_backs_off() -> None:
    healthy = asyncio.Event()
    attempts: list[int] = []

    async def create() -> Thing:
        attempts.append(1)
        if not healthy.is_set():
            raise ConnectionError("backend down")
        return Thing("flaky")

    spec = ClientSpec("flaky", create=create)
    registry = Registry([spec], **FAST)
    with registry.bind():
        with pytest.raises(ClientUnavailable) as first:
            await spec.get()
        assert "backend down" in first.value.message
        assert first.value.retry_after and first.value.retry_after > 0
        # Inside the backoff window: fail fast without calling the factory again.
        with pytest.raises(ClientUnavailable) as fast:
            await spec.get()
        assert len(attempts) == 1
        assert 0 < fast.value.retry_after <= first.value.retry_after
        healthy.set()
        # The first call after the window succeeds.
        thing = await wait_for_client(spec, timeout=10)
    assert thing.name == "flaky"
    assert len(attempts) == 2
    assert registry.failure("flaky") is None
    await registry.aclose()


async def wait_for_client(spec: ClientSpec[Any], timeout: float) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await spec.get()
            except ClientUnavailable as exc:
                await asyncio.sleep(exc.retry_after or 0.1)


async def test_backoff_grows_and_is_bounded() -> None:
    async def create() -> Thing:
        raise ConnectionError("down")

    spec = ClientSpec("down", create=create)
    registry = Registry([spec], backoff_initial=0.01, backoff_max=0.04)
    delays = []
    with registry.bind():
        for _ in range(5):
            try:
                await wait_for_failure(spec)
            except ClientUnavailable as exc:
                delays.append(exc.retry_after)
    assert delays[0] == pytest.approx(0.01)
    assert delays[1] == pytest.approx(0.02)
    assert delays[-1] == pytest.approx(0.04)


async def wait_for_failure(spec: ClientSpec[Any]) -> None:
    """Call until the factory itself runs and fails (not a fail-fast in the window)."""
    async with asyncio.timeout(10):
        while True:
            try:
                await spec.get()
            except ClientUnavailable as exc:
                if exc.__cause__ is not None:
                    raise
                await asyncio.sleep(exc.retry_after or 0.01)


async def test_creation_timeout_is_a_failure() -> None:
    async def create() -> Thing:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    spec = ClientSpec("hang", create=create)
    registry = Registry([spec], create_timeout=0.05)
    with registry.bind(), pytest.raises(ClientUnavailable, match="timed out"):
        await asyncio.wait_for(spec.get(), timeout=10)


async def test_cancelled_caller_does_not_abort_creation() -> None:
    spec, calls = counting_spec(delay=0.1)
    registry = Registry([spec], **FAST)
    with registry.bind():
        first = asyncio.create_task(spec.get())
        second = asyncio.create_task(spec.get())
        await asyncio.sleep(0)
        first.cancel()
        thing = await asyncio.wait_for(second, timeout=10)
    assert thing.name == "thing"
    assert len(calls) == 1
    await registry.aclose()


async def test_each_loop_gets_its_own_instance() -> None:
    spec, calls = counting_spec()
    app = Quart(__name__)
    loops = LoopClients([spec], app, **FAST)
    mine = loops.registry_for_running_loop()

    async def other_loop() -> tuple[Registry, Thing]:
        registry = loops.registry_for_running_loop()
        with registry.bind():
            thing = await spec.get()
        await registry.aclose()
        return registry, thing

    other_registry, other_thing = run_in_thread(other_loop)
    with mine.bind():
        my_thing = await spec.get()
    assert other_registry is not mine
    assert other_thing is not my_thing
    assert len(calls) == 2
    await mine.aclose()


async def test_foreign_loop_use_is_an_error_naming_the_client() -> None:
    spec, _ = counting_spec("cache")
    registry = Registry([spec], **FAST)
    with registry.bind():
        await spec.get()

    async def use_from_other_loop() -> None:
        with registry.bind():
            await asyncio.wait_for(spec.get(), timeout=5)

    with pytest.raises(ForeignLoopError, match="'cache'"):
        run_in_thread(use_from_other_loop)
    await registry.aclose()


async def test_close_in_reverse_order_and_one_failure_skips_nothing() -> None:
    closed: list[str] = []
    first, _ = counting_spec("first", close_log=closed)
    third, _ = counting_spec("third", close_log=closed)

    async def create_broken() -> Thing:
        return Thing("second")

    async def close_broken(thing: Thing) -> None:
        closed.append("second")
        raise RuntimeError("close failed")

    second = ClientSpec("second", create=create_broken, close=close_broken)
    registry = Registry([first, second, third], **FAST)
    with registry.bind():
        for spec in (first, second, third):
            await spec.get()
    with pytest.raises(ExceptionGroup) as group:
        await registry.aclose()
    assert closed == ["third", "second", "first"]
    assert [str(error) for error in group.value.exceptions] == ["close failed"]
    assert registry.created() == []
    with registry.bind(), pytest.raises(ClientUnavailable, match="closing"):
        await first.get()


async def test_close_timeout_does_not_block_the_rest() -> None:
    closed: list[str] = []
    quick, _ = counting_spec("quick", close_log=closed)

    async def create_stuck() -> Thing:
        return Thing("stuck")

    async def close_stuck(thing: Thing) -> None:
        await asyncio.Event().wait()

    stuck = ClientSpec("stuck", create=create_stuck, close=close_stuck)
    registry = Registry([quick, stuck], close_timeout=0.05)
    with registry.bind():
        await quick.get()
        await stuck.get()
    with pytest.raises(ExceptionGroup) as group:
        await asyncio.wait_for(registry.aclose(), timeout=10)
    assert closed == ["quick"]
    assert "stuck" in str(group.value.exceptions[0])


async def test_start_reports_failures_without_raising() -> None:
    good, _ = counting_spec("good")

    async def create_bad() -> Thing:
        raise ConnectionError("refused")

    bad = ClientSpec("bad", create=create_bad)
    lazy, lazy_calls = counting_spec("lazy")
    lazy = ClientSpec("lazy", create=lazy.create, eager=False)
    registry = Registry([good, bad, lazy], **FAST)
    failed = await registry.start()
    assert list(failed) == ["bad"]
    assert "refused" in failed["bad"]
    assert registry.created() == ["good"]
    assert lazy_calls == []
    await registry.aclose()


async def test_factory_can_use_other_clients_and_the_config() -> None:
    base, _ = counting_spec("base")

    async def create_derived() -> tuple[Thing, str]:
        return await base.get(), current_registry().config["project"]

    derived = ClientSpec("derived", create=create_derived)
    registry = Registry([base, derived], config={"project": "p1"}, **FAST)
    with registry.bind():
        thing, project = await derived.get()
    assert thing.name == "base"
    assert project == "p1"
    assert registry.created() == ["base", "derived"]
    await registry.aclose()


def test_accessor_outside_the_app_fails_clearly() -> None:
    spec, _ = counting_spec()
    assert not has_registry()
    with pytest.raises(RuntimeError, match="outside of a loopclients context"):
        current_registry()
    with pytest.raises(RuntimeError, match="outside of a loopclients context"):
        asyncio.run(spec.get())


def test_duplicate_names_are_refused() -> None:
    spec, _ = counting_spec()

    async def build() -> None:
        Registry([spec, spec], **FAST)

    with pytest.raises(ValueError, match="two clients"):
        asyncio.run(build())
