"""Tracing with OpenTelemetry: off by default; on, spans from the publish request to the delivery,
and the trace context in each message's ``googclient_traceparent``, as Google's libraries."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import PROJECT, WAIT, Topic, clean_exits, make_settings
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from quart import Quart

from devtools.emulators import free_port
from devtools.servers import DEFAULT_SERVER
from service import create_app
from service.config import SettingsError
from service.tracing import EXTENSION, TRACEPARENT, init_tracing

TRACE_ID = secrets.randbits(128) | 1
PARENT_ID = secrets.randbits(64) | 1
TRACEPARENT_HEADER = f"00-{TRACE_ID:032x}-{PARENT_ID:016x}-01"


def _data(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _body() -> dict[str, Any]:
    return {
        "messages": [
            {"data": _data("a"), "attributes": {"k": "v"}},
            {"data": _data("b"), "orderingKey": "key-1"},
        ]
    }


def _trace_id(traceparent: str) -> int:
    return int(traceparent.split("-")[1], 16)


def _span_id(traceparent: str) -> int:
    return int(traceparent.split("-")[2], 16)


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
async def traced(pubsub_emulator: Any) -> AsyncIterator[tuple[Quart, InMemorySpanExporter]]:
    app = create_app(make_settings(fanout_grace=0.2))
    exporter = InMemorySpanExporter()
    init_tracing(app, exporter=exporter)
    async with app.test_app():
        yield app, exporter


def _named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


async def test_published_messages_carry_the_requests_trace(
    traced: tuple[Quart, InMemorySpanExporter], topic: Topic
) -> None:
    app, _ = traced
    response = await app.test_client().post(
        f"/v1/topics/{topic.name}:publish",
        json=_body(),
        headers={"traceparent": TRACEPARENT_HEADER},
    )
    assert response.status_code == 200, await response.get_data()
    received = {m.data: m for m in topic.received(2)}
    assert set(received) == {b"a", b"b"}
    for message in received.values():
        assert _trace_id(message.attributes[TRACEPARENT]) == TRACE_ID
    assert received[b"a"].attributes["k"] == "v"  # the user's attributes are kept
    assert received[b"a"].attributes[TRACEPARENT] != received[b"b"].attributes[TRACEPARENT]


async def test_spans_from_the_request_to_the_publish_call(
    traced: tuple[Quart, InMemorySpanExporter], topic: Topic
) -> None:
    app, exporter = traced
    response = await app.test_client().post(
        f"/v1/topics/{topic.name}:publish",
        json=_body(),
        headers={"traceparent": TRACEPARENT_HEADER},
    )
    ids = (await response.get_json())["messageIds"]
    received = {m.message_id: m for m in topic.received(2)}
    spans = exporter.get_finished_spans()

    (server,) = _named(spans, "POST /v1/topics/{topic}:publish")
    assert server.kind is SpanKind.SERVER
    assert server.context is not None and server.parent is not None
    assert (server.context.trace_id, server.parent.span_id) == (TRACE_ID, PARENT_ID)
    assert server.parent.is_remote
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["messaging.batch.message_count"] == 2

    creates = _named(spans, f"{topic.name} create")
    assert len(creates) == 2
    by_id = {}
    for create in creates:
        assert create.kind is SpanKind.PRODUCER
        assert create.parent is not None and create.parent.span_id == server.context.span_id
        assert create.context is not None and create.context.trace_id == TRACE_ID
        attributes = dict(create.attributes or {})
        assert attributes["messaging.system"] == "gcp_pubsub"
        assert attributes["messaging.destination.name"] == topic.name
        assert attributes["messaging.operation.type"] == "create"
        assert attributes["gcp.project_id"] == PROJECT
        message_id = attributes["messaging.message.id"]
        by_id[message_id] = create
        # Each message carries its own create span's context.
        assert _span_id(received[message_id].attributes[TRACEPARENT]) == create.context.span_id
    assert sorted(by_id) == sorted(ids)
    assert by_id[ids[1]].attributes is not None
    assert by_id[ids[1]].attributes["messaging.gcp_pubsub.message.ordering_key"] == "key-1"

    batching = _named(spans, "publisher batching")
    assert sorted(span.parent.span_id for span in batching if span.parent) == sorted(
        create.context.span_id for create in creates if create.context
    )

    publishes = _named(spans, f"{topic.name} publish")  # one per ordering key's batch here
    assert publishes and all(span.kind is SpanKind.CLIENT for span in publishes)
    linked = {link.context.span_id for span in publishes for link in span.links}
    assert linked == {create.context.span_id for create in creates if create.context}
    for span in publishes:
        assert span.parent is None  # a root: one call carries the messages of many requests
        attributes = dict(span.attributes or {})
        assert attributes["messaging.operation.name"] == "publish"
        assert attributes["messaging.batch.message_count"] == len(span.links)
    publish_ids = {span.context.span_id for span in publishes if span.context}
    assert {link.context.span_id for c in creates for link in c.links} == publish_ids


async def test_no_context_where_pubsub_allows_no_more_attributes(
    traced: tuple[Quart, InMemorySpanExporter], topic: Topic
) -> None:
    app, exporter = traced
    full = {f"k{i}": "v" for i in range(100)}  # Pub/Sub's limit per message
    response = await app.test_client().post(
        f"/v1/topics/{topic.name}:publish",
        json={"messages": [{"data": _data("full"), "attributes": full}, {"data": _data("x")}]},
        headers={"traceparent": TRACEPARENT_HEADER},
    )
    assert response.status_code == 200, await response.get_data()
    received = {m.data: m for m in topic.received(2)}
    assert dict(received[b"full"].attributes) == full
    assert TRACEPARENT in received[b"x"].attributes
    assert len(_named(exporter.get_finished_spans(), f"{topic.name} create")) == 2


async def test_a_client_error_is_no_server_error(
    traced: tuple[Quart, InMemorySpanExporter], topic: Topic
) -> None:
    app, exporter = traced
    response = await app.test_client().post(
        f"/v1/topics/{topic.name}:publish",
        json={"messages": [{"data": "not base64!"}]},
        headers={"traceparent": TRACEPARENT_HEADER},
    )
    assert response.status_code == 400
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 400
    assert server.status.status_code is StatusCode.UNSET
    assert _named(exporter.get_finished_spans(), f"{topic.name} create") == []


async def test_one_delivery_span_per_message_linked_to_its_create_span(
    traced: tuple[Quart, InMemorySpanExporter], topic: Topic
) -> None:
    app, exporter = traced
    client = app.test_client()
    path = f"/v1/topics/{topic.name}/stream"
    async with client.websocket(path) as first, client.websocket(path) as second:
        for ws in (first, second):
            assert json.loads(await asyncio.wait_for(ws.receive(), WAIT))["type"] == "subscribed"
        response = await client.post(
            f"/v1/topics/{topic.name}:publish",
            json={"messages": [{"data": _data("x")}]},
            headers={"traceparent": TRACEPARENT_HEADER},
        )
        (message_id,) = (await response.get_json())["messageIds"]
        frames = [json.loads(await asyncio.wait_for(ws.receive(), WAIT)) for ws in (first, second)]
    for frame in frames:
        assert frame["messageId"] == message_id
        assert _trace_id(frame["attributes"][TRACEPARENT]) == TRACE_ID  # kept, as Google does
    spans = exporter.get_finished_spans()
    (create,) = _named(spans, f"{topic.name} create")
    (deliver,) = _named(spans, f"{topic.name} deliver")  # one for both subscribers
    assert deliver.kind is SpanKind.CONSUMER
    assert create.context is not None and deliver.context is not None
    assert deliver.context.trace_id == TRACE_ID
    assert deliver.parent is not None and deliver.parent.span_id == create.context.span_id
    assert [link.context.span_id for link in deliver.links] == [create.context.span_id]
    attributes = dict(deliver.attributes or {})
    assert attributes["messaging.message.id"] == message_id
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == topic.name
    assert attributes["loopgate.subscribers"] == 2


@pytest.fixture
def count_spans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the spans any SDK tracer starts, and a mark for each provider made."""
    started: list[str] = []
    start_span = Tracer.start_span
    provider_init = TracerProvider.__init__

    def counting_start(self: Tracer, name: str, *args: Any, **kwargs: Any) -> Any:
        started.append(name)
        return start_span(self, name, *args, **kwargs)

    def counting_init(self: TracerProvider, *args: Any, **kwargs: Any) -> None:
        started.append("<provider>")
        provider_init(self, *args, **kwargs)

    monkeypatch.setattr(Tracer, "start_span", counting_start)
    monkeypatch.setattr(TracerProvider, "__init__", counting_init)
    return started


@pytest.mark.parametrize(
    "environment",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"},
    ],
    ids=["unset", "none", "sdk-disabled"],
)
async def test_off_by_default(
    pubsub_emulator: Any,
    topic: Topic,
    monkeypatch: pytest.MonkeyPatch,
    count_spans: list[str],
    environment: dict[str, str],
) -> None:
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    app = create_app(make_settings())
    assert app.extensions[EXTENSION] is None
    async with app.test_app():
        client = app.test_client()
        async with client.websocket(f"/v1/topics/{topic.name}/stream") as ws:
            assert json.loads(await asyncio.wait_for(ws.receive(), WAIT))["type"] == "subscribed"
            response = await client.post(
                f"/v1/topics/{topic.name}:publish",
                json=_body(),
                headers={"traceparent": TRACEPARENT_HEADER},
            )
            assert response.status_code == 200
            frames = [json.loads(await asyncio.wait_for(ws.receive(), WAIT))]
            while sum(len(f.get("messages", [f])) for f in frames) < 2:
                frames.append(json.loads(await asyncio.wait_for(ws.receive(), WAIT)))
    for message in topic.received(2):
        assert TRACEPARENT not in message.attributes
    assert count_spans == []


def test_unknown_exporter_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(SettingsError, match="unknown exporter 'zipkin'"):
        create_app(make_settings())


def test_unsupported_protocol_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(SettingsError, match="http/json"):
        create_app(make_settings())


def test_grpc_without_its_exporter_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the gRPC exporter is installed here")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(SettingsError, match="opentelemetry-exporter-otlp-proto-grpc"):
        create_app(make_settings())


@pytest.mark.parametrize(("service", "expected"), [(None, "loopgate"), ("edge-gw", "edge-gw")])
def test_service_name_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, service: str | None, expected: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    if service:
        monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    tracing = init_tracing(Quart("t"))
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == expected
    finally:
        tracing.provider.shutdown()


# -- a real server exporting over OTLP/HTTP ---------------------------------------------------


class Collector:
    """An OTLP/HTTP trace receiver on loopback: what the server exports, decoded."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []  # (service.name, span)
        self.arrived = asyncio.Event()

    async def receive(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource.get("service.name", ""), span))
        self.arrived.set()
        return web.Response(content_type="application/x-protobuf", body=b"")

    async def until(self, names: set[str]) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while not names <= {span.name for _, span in self.spans}:
                self.arrived.clear()
                await self.arrived.wait()
        return {span.name: span for _, span in self.spans}


@pytest.fixture
async def collector() -> AsyncIterator[tuple[Collector, int]]:
    collector = Collector()
    web_app = web.Application()
    web_app.router.add_post("/v1/traces", collector.receive)
    runner = web.AppRunner(web_app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield collector, port
    await runner.cleanup()


@pytest.mark.server
async def test_real_server_exports_the_trace_over_otlp_when_it_stops(
    start_server: Any, topic: Topic, collector: tuple[Collector, int]
) -> None:
    receiver, port = collector
    server = await start_server(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{port}/v1/traces",
            # Nothing is exported before the server stops: its shutdown flushes what waits.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
            "OTEL_SERVICE_NAME": "loopgate-test",
        }
    )
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(f"{server.url}/v1/topics/{topic.name}/stream")
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
        async with session.post(
            f"{server.url}/v1/topics/{topic.name}:publish",
            json={"messages": [{"data": _data("x")}]},
            headers={"traceparent": TRACEPARENT_HEADER},
        ) as response:
            assert response.status == 200, await response.text()
        frame = await asyncio.wait_for(ws.receive_json(), WAIT)
        await ws.close()
    assert _trace_id(frame["attributes"][TRACEPARENT]) == TRACE_ID
    assert _trace_id(topic.received(1)[0].attributes[TRACEPARENT]) == TRACE_ID
    assert receiver.spans == []
    # In a thread: the server's exporter posts to the collector on this loop as it stops.
    assert await asyncio.to_thread(server.stop) in clean_exits(DEFAULT_SERVER)
    spans = await receiver.until(
        {
            "POST /v1/topics/{topic}:publish",
            f"{topic.name} create",
            f"{topic.name} publish",
            f"{topic.name} deliver",
        }
    )
    assert {service for service, _ in receiver.spans} == {"loopgate-test"}
    create = spans[f"{topic.name} create"]
    deliver = spans[f"{topic.name} deliver"]
    assert int.from_bytes(spans["POST /v1/topics/{topic}:publish"].trace_id) == TRACE_ID
    assert int.from_bytes(deliver.trace_id) == TRACE_ID
    assert deliver.parent_span_id == create.span_id
    assert [link.span_id for link in deliver.links] == [create.span_id]
    assert [link.span_id for link in spans[f"{topic.name} publish"].links] == [create.span_id]
