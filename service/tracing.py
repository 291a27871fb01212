"""Tracing with OpenTelemetry: off unless ``OTEL_TRACES_EXPORTER`` names an exporter.

:func:`init_tracing` (called once by ``create_app``) decides, from the standard ``OTEL_*``
variables, whether the app traces, and keeps its :class:`Tracing` in ``app.extensions`` (``None``
when off). The publish route asks for it once per request, and a feed once when it is made; the
publisher is handed the request's create spans. Off, they do nothing more: no span object is made,
and while no app of the process traces the question costs no app-context lookup either.

On, the spans follow google-cloud-pubsub's own (``google/cloud/pubsub_v1/open_telemetry/``), so that
a consumer written with Google's libraries continues the trace, and OpenTelemetry's messaging
conventions:

* ``POST /v1/topics/{topic}:publish`` (SERVER) continues the request's ``traceparent``;
* ``{topic} create`` (PRODUCER), one per message, child of the request's span; its context goes into
  the message's ``googclient_traceparent`` attribute (Google's name), and it ends when Pub/Sub has
  the message, with ``messaging.message.id``;
* ``publisher batching`` (INTERNAL), child of each create span: until its batch's call begins;
* ``{topic} publish`` (CLIENT), one per Pub/Sub call, linked to the messages' create spans (and they
  to it), as Google's publisher links them;
* ``{topic} deliver`` (CONSUMER), one per received message per worker (not per subscriber) that
  carries ``googclient_traceparent``: its hand-over to the local subscribers' queues, a child of the
  message's create span and linked to it.

The SDK (``opentelemetry-sdk``) and the OTLP exporter are the ``otel`` extra; they are imported
only when tracing is on, by :mod:`service.tracing_sdk`, which makes the provider and its exporters.
The tracer provider is the app's own (not OpenTelemetry's global one), made once per process and
shut down, flushing what waits, when the app stops serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from quart import Quart, current_app, has_app_context

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from werkzeug.datastructures import Headers

    from .clients.pubsub.messages import OutgoingMessage

EXTENSION = "loopgate.tracing"  # where the app keeps its Tracing (None when off)
PREFIX = "googclient_"  # of the trace context in message attributes, as Google's libraries
TRACEPARENT = PREFIX + "traceparent"
MAX_ATTRIBUTES = 100  # Pub/Sub's limit per message: the context goes in only when it fits
SYSTEM = "gcp_pubsub"

# Whether any app of this process traces: until one does, :func:`current` answers without the
# app-context lookup, which costs microseconds on every publish.
_active = False

_PROPAGATOR = TraceContextTextMapPropagator()  # into messages: W3C trace context, as Google's


class _PrefixedGetter(Getter[Mapping[str, str]]):
    """Reads ``traceparent`` and ``tracestate`` from ``googclient_``-prefixed attributes."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(PREFIX + key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _PrefixedGetter()


class Tracing:
    """The app's tracer, and the spans of the publish path and the fan-out."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("loopgate", _version())
        self._serving = 0  # event loops serving the app: the provider is shut down after the last

    # -- the publish route --------------------------------------------------------------------

    @contextmanager
    def request_span(
        self, headers: Headers | Mapping[str, str], rule: str, topic: str
    ) -> Iterator[trace.Span]:
        """The SERVER span of a publish request, continuing its ``traceparent`` (the propagators
        of ``OTEL_PROPAGATORS``, W3C trace context by default)."""
        route = rule.replace("<", "{").replace(">", "}")
        with self.tracer.start_as_current_span(
            f"POST {route}",
            context=propagate.extract(headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "http.route": route,
                "messaging.system": SYSTEM,
                "messaging.destination.name": topic,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except BaseException as exc:
                status = getattr(exc, "status_code", None) or getattr(exc, "code", None)
                if not isinstance(status, int):
                    status = 500
                span.set_attribute("http.response.status_code", status)
                span.set_attribute("error.type", type(exc).__qualname__)
                if status >= 500:  # a client's error is no error of the server's span
                    span.record_exception(exc)
                    span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))
                raise
            span.set_attribute("http.response.status_code", 200)

    def start_creates(self, topic_path: str, messages: list[OutgoingMessage]) -> PublishTrace:
        """Start each message's create span and put its context in the message's attributes.

        ``messages`` are changed in place: a message without attributes gets a dict of its own.
        """
        _, project, _, topic = topic_path.split("/")
        tracer = self.tracer
        spans: list[trace.Span] = []
        base = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": topic,
            "messaging.operation.type": "create",
            "messaging.operation.name": "create",
            "gcp.project_id": project,
        }
        trace.get_current_span().set_attribute("messaging.batch.message_count", len(messages))
        for index, message in enumerate(messages):
            attributes: dict[str, Any] = {**base, "messaging.message.body.size": len(message.data)}
            if message.ordering_key:
                attributes["messaging.gcp_pubsub.message.ordering_key"] = message.ordering_key
            span = tracer.start_span(
                f"{topic} create", kind=SpanKind.PRODUCER, attributes=attributes
            )
            spans.append(span)
            fields: dict[str, str] = {}
            _PROPAGATOR.inject(fields, context=set_span_in_context(span))
            carrier = message.attributes
            if carrier is None:
                carrier = {}
                messages[index] = message._replace(attributes=carrier)
            if len(carrier) + len(fields) <= MAX_ATTRIBUTES:
                for key, value in fields.items():
                    carrier[PREFIX + key] = value
        return PublishTrace(tracer, spans)

    # -- the fan-out --------------------------------------------------------------------------

    def start_deliveries(
        self, topic: str, subscription: str, messages: Sequence[Any], subscribers: int
    ) -> list[trace.Span]:
        """A CONSUMER span for each of ``messages`` (received Pub/Sub messages) that carries a
        producer's context, handed over to ``subscribers`` local subscribers."""
        spans: list[trace.Span] = []
        for message in messages:
            carrier = message.attributes
            if TRACEPARENT not in carrier:
                continue
            context = _PROPAGATOR.extract(carrier, getter=_GETTER)
            producer = trace.get_current_span(context).get_span_context()
            if not producer.is_valid:
                continue
            attributes: dict[str, Any] = {
                "messaging.system": SYSTEM,
                "messaging.destination.name": topic,
                "messaging.destination.subscription.name": subscription.rsplit("/", 1)[-1],
                "messaging.operation.type": "process",
                "messaging.operation.name": "deliver",
                "messaging.message.id": message.message_id,
                "messaging.message.body.size": len(message.data),
                "loopgate.subscribers": subscribers,
            }
            if message.ordering_key:
                attributes["messaging.gcp_pubsub.message.ordering_key"] = message.ordering_key
            spans.append(
                self.tracer.start_span(
                    f"{topic} deliver",
                    context=context,
                    kind=SpanKind.CONSUMER,
                    links=[Link(producer)],
                    attributes=attributes,
                )
            )
        return spans

    # -- the lifecycle ------------------------------------------------------------------------

    async def _started(self) -> None:
        self._serving += 1

    async def _stopped(self) -> None:
        self._serving -= 1
        if self._serving <= 0:
            # After the clients closed (the publisher's last calls have their spans): exporting
            # what waits may take the exporter's timeout, so off the loop.
            await asyncio.to_thread(self.provider.shutdown)


class PublishTrace:
    """The create spans of one request's messages, in the order of the messages."""

    __slots__ = ("batching", "spans", "tracer")

    def __init__(self, tracer: trace.Tracer, spans: list[trace.Span]) -> None:
        self.tracer = tracer
        self.spans = spans
        self.batching: list[trace.Span | None] = [None] * len(spans)

    def add_to(self, batch: Any, start: int, end: int) -> None:
        """Messages ``start`` to ``end`` went into ``batch``: start their batching spans."""
        batch_trace: BatchTrace | None = batch.trace
        if batch_trace is None:
            batch_trace = batch.trace = BatchTrace(self.tracer)
        tracer = self.tracer
        for index in range(start, end):
            create = self.spans[index]
            batch_trace.creates.append(create)
            if create.is_recording():
                span = tracer.start_span(
                    "publisher batching",
                    context=set_span_in_context(create),
                    attributes={"messaging.system": SYSTEM},
                )
                self.batching[index] = span
                batch_trace.batching.append(span)

    def end(self, ids: Sequence[str] | None = None, error: BaseException | None = None) -> None:
        """End the create spans: with their message ids, or with ``error``."""
        for span in self.batching:
            if span is not None and span.is_recording():  # its batch never went
                span.end()
        for index, span in enumerate(self.spans):
            if error is not None:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
            elif ids is not None:
                span.set_attribute("messaging.message.id", ids[index])
            span.end()


class BatchTrace:
    """What a batch carrying traced messages needs for its publish span."""

    __slots__ = ("batching", "creates", "tracer")

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self.creates: list[trace.Span] = []
        self.batching: list[trace.Span] = []

    @contextmanager
    def publish_span(self, batch: Any) -> Iterator[trace.Span]:
        """The CLIENT span of ``batch``'s Pub/Sub call; it ends the batching spans.

        A root span linked to the messages' sampled create spans, which are linked to it, as
        Google's publisher does: one call carries the messages of many requests.
        """
        for span in self.batching:
            if span.is_recording():  # not ended with its request's failure
                span.end()
        self.batching.clear()
        _, project, _, topic = batch.topic.split("/")
        links = [
            Link(context)
            for context in (span.get_span_context() for span in self.creates)
            if context.trace_flags.sampled
        ]
        with self.tracer.start_as_current_span(
            f"{topic} publish",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root span
            kind=SpanKind.CLIENT,
            links=links,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.destination.name": topic,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.batch.message_count": batch.count,
                "gcp.project_id": project,
            },
        ) as span:
            context = span.get_span_context()
            if span.is_recording():
                for create in self.creates:
                    if create.is_recording():
                        create.add_link(context)
            yield span


def end_deliveries(spans: list[trace.Span], dropped: int) -> None:
    """End the spans of :meth:`Tracing.start_deliveries`; ``dropped``: the messages the
    hand-over dropped from full queues."""
    for span in spans:
        if dropped:
            span.set_attribute("loopgate.dropped", dropped)
        span.end()


def current() -> Tracing | None:
    """The current app's :class:`Tracing`; ``None`` when it does not trace or outside an app."""
    if not _active or not has_app_context():
        return None
    tracing: Tracing | None = current_app.extensions.get(EXTENSION)
    return tracing


def init_tracing(
    app: Quart,
    *,
    exporter: SpanExporter | None = None,
    provider: TracerProvider | None = None,
) -> Tracing | None:
    """Decide whether ``app`` traces, and keep the answer in ``app.extensions``.

    Args:
        app: the app.
        exporter: export to this exporter, synchronously, whatever the environment says (for
            tests); otherwise ``OTEL_TRACES_EXPORTER`` decides.
        provider: trace with this provider, whatever the environment says (for benchmarks);
            the app shuts it down when it stops serving.

    Raises:
        SettingsError: ``OTEL_TRACES_EXPORTER`` names an unknown exporter, or one whose package
            is not installed.
    """
    tracing: Tracing | None
    if provider is not None:
        tracing = Tracing(provider)
    elif exporter is not None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        from .tracing_sdk import provider_with

        tracing = Tracing(provider_with([SimpleSpanProcessor(exporter)]))
    else:
        from .tracing_sdk import from_environment

        made = from_environment()
        tracing = None if made is None else Tracing(made)
    app.extensions[EXTENSION] = tracing
    if tracing is not None:
        global _active
        _active = True
        app.before_serving(tracing._started)
        app.after_serving(tracing._stopped)  # after the clients' lifespan has closed them
    return tracing


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("loopgate")
    except PackageNotFoundError:
        return None
