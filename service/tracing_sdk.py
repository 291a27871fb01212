"""The OpenTelemetry SDK side of :mod:`service.tracing`: the tracer provider and its exporters,
from the standard ``OTEL_*`` variables. The SDK and the OTLP exporter are the ``otel`` extra: they are
imported only once the environment asks for tracing.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .config import SettingsError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

EXPORTERS = ("otlp", "console")


def from_environment() -> TracerProvider | None:
    """The provider that ``OTEL_TRACES_EXPORTER`` asks for, or ``None`` when it asks for none.

    Raises:
        SettingsError: an unknown exporter, or one whose package is not installed.
    """
    names = [
        name.strip().lower()
        for name in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip().lower() not in ("", "none")
    ]
    if not names or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    for name in names:
        if name not in EXPORTERS:
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r}; loopgate knows "
                f"{', '.join(EXPORTERS)} and none"
            )
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processors = [BatchSpanProcessor(_exporter(name)) for name in names]
    except ImportError as exc:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER={os.environ['OTEL_TRACES_EXPORTER']} needs {exc.name or exc}: "
            "pip install 'loopgate[otel]'"
        ) from None
    return provider_with(processors)


def _exporter(name: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, timeout...: from OTEL_EXPORTER_OTLP_*
    if protocol == "grpc":  # needs opentelemetry-exporter-otlp-proto-grpc, not in the extra
        try:
            grpc = importlib.import_module("opentelemetry.exporter.otlp.proto.grpc.trace_exporter")
        except ImportError:
            raise SettingsError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc: "
                "pip install it, or export over http/protobuf (the default)"
            ) from None
        exporter: SpanExporter = grpc.OTLPSpanExporter()
        return exporter
    raise SettingsError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use http/protobuf or grpc"
    )


def provider_with(processors: Sequence[Any]) -> TracerProvider:
    """A provider with the resource of ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
    (service name ``loopgate`` unless they name one) and the sampler of ``OTEL_TRACES_SAMPLER``,
    sending its spans to ``processors``."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "loopgate"}))
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider
