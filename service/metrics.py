"""Prometheus metrics, summed over the workers of one instance.

Hypercorn runs each worker in its own process, so the metrics use prometheus-client's multiprocess
mode: every worker writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums
them. :func:`ensure_multiprocess_dir` (called when the ``service`` package is imported, before
prometheus-client is) picks a directory shared by the workers of one Hypercorn master when the
variable is not set.
"""

from __future__ import annotations

import os
import tempfile


def ensure_multiprocess_dir() -> str:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` if unset: one directory per Hypercorn master process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        # Workers are children of the Hypercorn master, so they share its pid.
        path = os.path.join(tempfile.gettempdir(), f"loopgate-metrics-{os.getppid()}")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.makedirs(path, exist_ok=True)
    return path


ensure_multiprocess_dir()

from prometheus_client import (  # noqa: E402  (the directory must be set before this import)
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from .loopclients import Hooks  # noqa: E402

CLIENT_CREATIONS = Counter(
    "loopgate_client_creations", "Clients created, per client name.", ["client"]
)
CLIENT_CREATION_FAILURES = Counter(
    "loopgate_client_creation_failures",
    "Client creations that failed, per client name.",
    ["client"],
)

PUBLISH_REQUESTS = Counter(
    "loopgate_publish_requests", "Publish requests, by outcome.", ["outcome"]
)
PUBLISH_MESSAGES = Counter("loopgate_publish_messages", "Messages published to Pub/Sub.")
PUBLISH_LATENCY = Histogram(
    "loopgate_publish_latency_seconds",
    "Time from accepting a publish request's messages to Pub/Sub's answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PUBLISH_BATCH_SIZE = Histogram(
    "loopgate_publish_batch_messages",
    "Messages per Pub/Sub publish call.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
PUBLISH_BATCH_ERRORS = Counter(
    "loopgate_publish_batch_errors", "Pub/Sub publish calls that failed after retries.", ["reason"]
)
PUBLISH_PENDING = Gauge(
    "loopgate_publish_pending_messages",
    "Messages accepted and not yet answered by Pub/Sub.",
    # A worker that shut down cleanly flushed everything, so its last value is 0.
    multiprocess_mode="livesum",
)

STREAM_SUBSCRIBERS = Gauge(
    "loopgate_stream_subscribers",
    "Connected websocket and SSE subscribers, per topic.",
    ["topic"],
    multiprocess_mode="livesum",
)
STREAM_DELIVERIES = Counter(
    "loopgate_stream_deliveries",
    "Messages written to subscriber connections, per topic.",
    ["topic"],
)
STREAM_CATCHUPS = Counter(
    "loopgate_stream_catchups",
    "Catch-up subscriptions made to resume subscribers from a topic's retention, per topic.",
    ["topic"],
)
STREAM_DROPS = Counter(
    "loopgate_stream_drops",
    "Messages dropped from slow subscribers' queues (or connections closed: reason=closed).",
    ["topic", "reason"],
)
STREAM_QUEUE_DEPTH = Gauge(
    "loopgate_stream_queue_depth",
    "Messages waiting in subscriber queues (sampled every second).",
    multiprocess_mode="livesum",
)
STREAM_LATENCY = Histogram(
    "loopgate_stream_delivery_latency_seconds",
    "Time from Pub/Sub's publish time to writing the message to a subscriber (the oldest message "
    "of a frame; at most 100 frames per second and worker are sampled).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
FANOUT_SUBSCRIPTIONS = Gauge(
    "loopgate_fanout_subscriptions",
    "Pub/Sub subscriptions this instance holds for fan-out.",
    multiprocess_mode="livesum",
)

STORAGE_BYTES = Counter(
    "loopgate_storage_bytes", "Object bytes moved through loopgate, by direction.", ["direction"]
)
STORAGE_TRANSFERS = Gauge(
    "loopgate_storage_transfers",
    "Object uploads and downloads in progress, by direction.",
    ["direction"],
    multiprocess_mode="livesum",
)


CLIENT_HOOKS = Hooks(
    created=lambda name: CLIENT_CREATIONS.labels(client=name).inc(),
    failed=lambda name, _error: CLIENT_CREATION_FAILURES.labels(client=name).inc(),
)


def render() -> tuple[bytes, str]:
    """The metrics of every worker of this instance, in Prometheus text format."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # unannotated upstream
    return generate_latest(registry), CONTENT_TYPE_LATEST
