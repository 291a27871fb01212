"""The batching publisher against the real emulator (fakes only for injected faults)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import PROJECT, Topic, make_settings, run_in_thread
from google.api_core import exceptions as gexc

from service import Registry
from service.clients import PUBLISHER, builtin_clients
from service.clients.pubsub.messages import RAW_MESSAGE, RAW_REQUEST, OutgoingMessage, wire_size
from service.clients.pubsub.publisher import Publisher
from service.errors import BackendError, PermissionDenied, PublisherOverloaded, TopicNotFound
from service.loopclients import ForeignLoopError


async def publisher_with(pubsub_emulator: Any, **overrides: Any) -> tuple[Registry, Publisher]:
    registry = Registry(builtin_clients(), config=make_settings(**overrides))
    with registry.bind():
        publisher = await PUBLISHER.get()
    return registry, publisher


@pytest.fixture
async def publisher(pubsub_emulator: Any) -> AsyncIterator[Publisher]:
    registry, publisher = await publisher_with(pubsub_emulator)
    yield publisher
    await registry.aclose()


def path(topic: Topic | str) -> str:
    name = topic.name if isinstance(topic, Topic) else topic
    return f"projects/{PROJECT}/topics/{name}"


class CountingClient:
    """Forwards to the real client and counts publish calls (a spy, not a fake)."""

    def __init__(self, real: Any, failures: list[BaseException] | None = None) -> None:
        self.real = real
        self.calls: list[int] = []
        self.failures = failures or []

    @property
    def transport(self) -> Any:
        return self.real.transport

    async def publish(self, *, request: Any, retry: Any, timeout: float) -> Any:
        self.calls.append(len(request.messages))
        if self.failures:
            raise self.failures.pop(0)
        return await self.real.publish(request=request, retry=retry, timeout=timeout)


async def test_concurrent_requests_are_batched(publisher: Publisher, topic: Topic) -> None:
    spy = CountingClient(publisher.client)
    publisher._client = spy  # type: ignore[assignment]
    requests = [publisher.publish(path(topic), [RAW_MESSAGE(data=b"%d" % i)]) for i in range(500)]
    results = await asyncio.wait_for(asyncio.gather(*requests), timeout=30)
    ids = [result[0] for result in results]
    assert len(set(ids)) == 500
    assert sum(spy.calls) == 500
    assert len(spy.calls) < 50, spy.calls
    received = topic.received(500)
    assert sorted(m.message_id for m in received) == sorted(ids)
    assert publisher.pending_messages == 0


async def test_ids_come_back_in_request_order(publisher: Publisher, topic: Topic) -> None:
    messages = [RAW_MESSAGE(data=b"m%d" % i) for i in range(250)]
    ids = await asyncio.wait_for(publisher.publish(path(topic), messages), timeout=30)
    by_id = {m.message_id: m.data for m in topic.received(250)}
    assert [by_id[message_id] for message_id in ids] == [b"m%d" % i for i in range(250)]


async def test_batch_limits_split_batches(pubsub_emulator: Any, topic: Topic) -> None:
    registry, publisher = await publisher_with(
        pubsub_emulator, publish_max_messages=10, publish_max_latency=1.0
    )
    spy = CountingClient(publisher.client)
    publisher._client = spy  # type: ignore[assignment]
    ids = await asyncio.wait_for(
        publisher.publish(path(topic), [RAW_MESSAGE(data=b"x")] * 35), timeout=30
    )
    assert len(ids) == 35
    assert sorted(spy.calls) == [5, 10, 10, 10]
    await registry.aclose()


async def test_ordering_key_keeps_order(publisher: Publisher, admin: Any) -> None:
    name = admin.create_topic()
    subscription = admin.create_subscription(name, ordering=True)
    tasks = [
        asyncio.create_task(
            publisher.publish(path(name), [RAW_MESSAGE(data=b"%d" % i, ordering_key="k")])
        )
        for i in range(100)
    ]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    received = admin.pull(subscription, 100)
    assert [int(m.data) for m in received] == list(range(100))
    assert {m.ordering_key for m in received} == {"k"}


async def test_transient_errors_are_retried(publisher: Publisher, topic: Topic) -> None:
    spy = CountingClient(publisher.client)
    publisher._client = spy  # type: ignore[assignment]
    # The generated client applies the retry policy; these failures come before it, so
    # wrap them the way the retry wrapper sees them: call publish through the retry.
    spy.failures = []
    flaky_calls: list[int] = []
    real_publish = spy.publish

    async def flaky(*, request: Any, retry: Any, timeout: float) -> Any:
        async def attempt() -> Any:
            flaky_calls.append(1)
            if len(flaky_calls) <= 2:
                raise gexc.ServiceUnavailable("emulated outage")
            return await real_publish(request=request, retry=None, timeout=timeout)

        return await retry(attempt)()

    spy.publish = flaky  # type: ignore[method-assign]
    ids = await asyncio.wait_for(publisher.publish(path(topic), [RAW_MESSAGE(data=b"r")]), 30)
    assert len(flaky_calls) == 3
    assert [m.message_id for m in topic.received(1)] == ids


async def test_a_failed_ordering_key_batch_fails_the_ones_queued_behind_it(
    publisher: Publisher, topic: Topic
) -> None:
    spy = CountingClient(publisher.client)
    in_flight, release = asyncio.Event(), asyncio.Event()
    forward = spy.publish

    async def gated(*, request: Any, retry: Any, timeout: float) -> Any:
        if request.messages[0].ordering_key == "k" and not in_flight.is_set():
            spy.calls.append(len(request.messages))
            in_flight.set()
            await release.wait()
            raise gexc.PermissionDenied("denied")
        return await forward(request=request, retry=retry, timeout=timeout)

    spy.publish = gated  # type: ignore[method-assign]
    publisher._client = spy  # type: ignore[assignment]
    first = asyncio.create_task(
        publisher.publish(path(topic), [RAW_MESSAGE(data=b"1", ordering_key="k")])
    )
    await asyncio.wait_for(in_flight.wait(), 10)
    second = asyncio.create_task(
        publisher.publish(path(topic), [RAW_MESSAGE(data=b"2", ordering_key="k")])
    )
    other_key = asyncio.create_task(
        publisher.publish(path(topic), [RAW_MESSAGE(data=b"3", ordering_key="other")])
    )
    assert len(await asyncio.wait_for(other_key, 10)) == 1
    release.set()
    with pytest.raises(PermissionDenied, match="denied"):
        await asyncio.wait_for(first, 10)
    with pytest.raises(BackendError, match="ordering key 'k'"):
        await asyncio.wait_for(second, 10)
    assert spy.calls == [1, 1]  # the failing first batch, then "other"; never the second
    # Once nothing of the key is in flight, a new request of the key is published again.
    assert (
        len(
            await asyncio.wait_for(
                publisher.publish(path(topic), [RAW_MESSAGE(data=b"4", ordering_key="k")]), 10
            )
        )
        == 1
    )
    assert sorted(m.data for m in topic.received(2)) == [b"3", b"4"]


async def test_pending_bound_refuses_instead_of_growing(pubsub_emulator: Any, topic: Topic) -> None:
    registry, publisher = await publisher_with(
        pubsub_emulator, publish_max_pending_messages=5, publish_max_latency=0.5
    )
    accepted = asyncio.create_task(publisher.publish(path(topic), [RAW_MESSAGE(data=b"a")] * 5))
    await asyncio.sleep(0)
    with pytest.raises(PublisherOverloaded) as refused:
        await publisher.publish(path(topic), [RAW_MESSAGE(data=b"b")])
    assert refused.value.status_code == 503
    assert "Retry-After" in refused.value.headers()
    assert len(await asyncio.wait_for(accepted, 10)) == 5
    # Once answered, there is room again.
    assert (
        len(await asyncio.wait_for(publisher.publish(path(topic), [RAW_MESSAGE(data=b"c")]), 10))
        == 1
    )
    assert sorted(m.data for m in topic.received(6)) == [b"a"] * 5 + [b"c"]
    await registry.aclose()


async def test_missing_topic_is_not_found(publisher: Publisher) -> None:
    with pytest.raises(TopicNotFound, match="no-such-topic"):
        await asyncio.wait_for(
            publisher.publish(path("no-such-topic"), [RAW_MESSAGE(data=b"x")]), 30
        )


async def test_close_flushes_every_accepted_message(pubsub_emulator: Any, topic: Topic) -> None:
    registry, publisher = await publisher_with(pubsub_emulator, publish_max_latency=1.0)
    tasks = [
        asyncio.create_task(publisher.publish(path(topic), [RAW_MESSAGE(data=b"%d" % i)]))
        for i in range(50)
    ]
    await asyncio.sleep(0)  # accepted, waiting for the 1 s latency trigger
    assert publisher.pending_messages == 50
    await asyncio.wait_for(registry.aclose(), timeout=10)
    ids = [result[0] for result in await asyncio.wait_for(asyncio.gather(*tasks), 10)]
    assert sorted(m.message_id for m in topic.received(50)) == sorted(ids)


async def test_publisher_refuses_a_foreign_loop(publisher: Publisher, topic: Topic) -> None:
    async def publish_elsewhere() -> None:
        await publisher.publish(path(topic), [RAW_MESSAGE(data=b"x")])

    with pytest.raises(ForeignLoopError, match="'publisher'"):
        run_in_thread(publish_elsewhere)


async def test_one_request_of_mixed_keys_splits_by_key_count_and_bytes(
    pubsub_emulator: Any, topic: Topic
) -> None:
    registry, publisher = await publisher_with(
        pubsub_emulator, publish_max_messages=3, publish_max_bytes=1024, publish_max_latency=1.0
    )
    spy = CountingClient(publisher.client)
    publisher._client = spy  # type: ignore[assignment]
    keys = ["", "", "a", "a", "", "b", "a", "a", "a", "a", "", "", "", "", "big", "big", ""]
    messages = [
        RAW_MESSAGE(data=(b"%d" % i) * (300 if key == "big" else 1), ordering_key=key)
        for i, key in enumerate(keys)
    ]
    ids = await asyncio.wait_for(publisher.publish(path(topic), messages), timeout=30)
    assert len(set(ids)) == len(keys)
    by_id = {m.message_id: (m.data, m.ordering_key) for m in topic.received(len(keys))}
    assert [by_id[message_id] for message_id in ids] == [(m.data, m.ordering_key) for m in messages]
    # No call exceeds the count limit; the key changes and the limits decide the splits.
    assert sum(spy.calls) == len(keys) and max(spy.calls) <= 3
    assert spy.calls.count(1) >= 3  # "b" alone, and the two "big" ones apart (2 x 600 > 1,024 B)
    assert publisher.pending_messages == 0
    await registry.aclose()


@pytest.mark.parametrize("max_in_flight", [1, 2])
async def test_a_batch_that_is_not_full_waits_for_an_answer_at_the_in_flight_cap(
    pubsub_emulator: Any, topic: Topic, max_in_flight: int
) -> None:
    registry, publisher = await publisher_with(
        pubsub_emulator, publish_max_latency=0.01, publish_max_in_flight=max_in_flight
    )
    first_sent, release = asyncio.Event(), asyncio.Event()
    try:
        spy = CountingClient(publisher.client)

        async def held_first(*, request: Any, retry: Any, timeout: float) -> Any:
            spy.calls.append(len(request.messages))
            if not first_sent.is_set():
                first_sent.set()
                await release.wait()
            return await spy.real.publish(request=request, retry=retry, timeout=timeout)

        spy.publish = held_first  # type: ignore[method-assign]
        publisher._client = spy  # type: ignore[assignment]
        timer_fired = asyncio.Event()
        on_timer = publisher._on_timer

        def spied_timer(key: tuple[str, str]) -> None:
            on_timer(key)
            timer_fired.set()

        publisher._on_timer = spied_timer  # type: ignore[method-assign]
        first = asyncio.create_task(publisher.publish(path(topic), [RAW_MESSAGE(data=b"a")]))
        await asyncio.wait_for(first_sent.wait(), 10)  # nothing was in flight: sent at once
        later = [
            asyncio.create_task(publisher.publish(path(topic), [RAW_MESSAGE(data=d)]))
            for d in (b"b", b"c")
        ]
        await asyncio.wait_for(timer_fired.wait(), 10)  # max_latency has passed
        await asyncio.sleep(0)  # a call started by the timer has reached the spy
        if max_in_flight == 1:
            assert spy.calls == [1]  # still gathering: the first call is unanswered
        else:
            assert spy.calls == [1, 2]  # below the cap: it went after max_latency
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *later), 10)
        assert spy.calls == [1, 2]  # b and c in one call either way
        assert sorted(m.data for m in topic.received(3)) == [b"a", b"b", b"c"]
    finally:
        release.set()
        await registry.aclose()


@pytest.mark.parametrize(
    "message",
    [
        OutgoingMessage(b""),
        OutgoingMessage(b"x" * 200),
        OutgoingMessage(b"x" * 20_000, {"k": "v", "ключ": "значение" * 100}, "ordering-κ"),
        OutgoingMessage(b"", {f"k{i}": "v" * 1024 for i in range(100)}, "k" * 1024),
    ],
)
def test_wire_size_bounds_what_a_message_adds_to_a_request(message: OutgoingMessage) -> None:
    # Batches are cut by this bound, so that a call never exceeds Pub/Sub's request size.
    request = RAW_REQUEST(topic="projects/p/topics/t")
    empty = request.ByteSize()
    added = request.messages.add(data=message.data, ordering_key=message.ordering_key)
    added.attributes.update(message.attributes or {})
    assert request.ByteSize() - empty <= wire_size(message)
