"""``python -m bench.tracing``: what tracing costs a publish request, in process.

One app per variant, all in this process and on one event loop, publishing to a Pub/Sub emulator
that the benchmark starts (or the one ``PUBSUB_EMULATOR_HOST`` names). Each request goes through
Quart's test client with a ``traceparent`` header; ``time.process_time`` counts the CPU of every
thread of the process (the loop's, gRPC's and the span processor's). The variants:

* ``off``: ``OTEL_TRACES_EXPORTER`` unset, the default;
* ``on-sampled``: tracing on, every span recorded and handed to a batch span processor, as in
  production, whose exporter drops them (the cost of the spans, not of a collector's network);
* ``on-unsampled``: tracing on, the request's ``traceparent`` not sampled (flags ``00``): the
  cost left when a sampler drops the trace.

Rounds interleave the variants, in a rotated order each round, so that noise from other work on
the machine falls on all of them alike; the table shows medians over the rounds, per request and
per message. Then a tight loop over the hook every publish runs when tracing is off (the app's
switch, looked up through the app context). Absolute numbers depend on the machine; compare the
variants of one run::

    python -m bench.tracing [--requests 2000] [--rounds 5] [--messages 1,100] [--concurrency 16]

A smoke run, to check that it works (its numbers mean nothing):
``python -m bench.tracing --requests 50 --rounds 1 --messages 1,10``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import secrets
import statistics
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from typing import Any

from devtools.emulators import PubSubEmulator
from devtools.run import create_topics

PROJECT = "loopgate-bench"
TOPIC = "bench-tracing"
PATH = f"/v1/topics/{TOPIC}:publish"
PAYLOAD = base64.b64encode(b"x" * 64).decode()
VARIANTS = ("off", "on-sampled", "on-unsampled")


class _Discarding:
    """A span exporter that drops what it is handed."""

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def _app(variant: str) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from service import create_app, load_settings
    from service.tracing import init_tracing

    os.environ.pop("OTEL_TRACES_EXPORTER", None)
    app = create_app(
        load_settings({}, project=PROJECT, topics=TOPIC, auth="disabled", log_level="WARNING")
    )
    if variant != "off":
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(_Discarding()))  # type: ignore[arg-type]
        init_tracing(app, provider=provider)
    return app


def _traceparent(sampled: bool) -> str:
    flags = "01" if sampled else "00"
    return f"00-{secrets.randbits(128) | 1:032x}-{secrets.randbits(64) | 1:016x}-{flags}"


async def _round(app: Any, variant: str, requests: int, messages: int, concurrency: int) -> float:
    """CPU microseconds per request for ``requests`` publishes of ``messages`` messages each."""
    from service import tracing

    client = app.test_client()
    body = {"messages": [{"data": PAYLOAD} for _ in range(messages)]}
    sampled = variant != "on-unsampled"

    async def worker(count: int) -> None:
        for _ in range(count):
            response = await client.post(
                PATH, json=body, headers={"traceparent": _traceparent(sampled)}
            )
            if response.status_code != 200:
                raise RuntimeError(f"{variant}: {response.status_code} {await response.get_data()}")

    share = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    # Which app traces is decided at its creation; whether any app of the process does is one
    # flag, which the traced apps here have set: off, a process has no traced app.
    tracing._active = variant != "off"
    started = time.process_time()
    await asyncio.gather(*(worker(count) for count in share if count))
    return 1e6 * (time.process_time() - started) / requests


async def _off_hook(app: Any, count: int = 200_000) -> float:
    """Nanoseconds per call of the switch a publish looks up when tracing is off."""
    from service import tracing

    tracing._active = False  # as in a process whose apps do not trace
    async with app.app_context():
        started = time.perf_counter()
        for _ in range(count):
            tracing.current()
        return 1e9 * (time.perf_counter() - started) / count


async def main_async(args: argparse.Namespace) -> None:
    batches = [int(value) for value in args.messages.split(",")]
    apps = {variant: _app(variant) for variant in VARIANTS}
    results: dict[tuple[str, int], list[float]] = {key: [] for key in _keys(batches)}
    async with AsyncExitStack() as stack:
        for app in apps.values():
            await stack.enter_async_context(app.test_app())
        for messages in batches:  # warm up: clients, channels, caches
            for variant, app in apps.items():
                await _round(app, variant, max(20, args.requests // 10), messages, args.concurrency)
        for number in range(args.rounds):
            for messages in batches:
                order = VARIANTS[number % 3 :] + VARIANTS[: number % 3]
                for variant in order:
                    results[(variant, messages)].append(
                        await _round(
                            apps[variant], variant, args.requests, messages, args.concurrency
                        )
                    )
        hook = await _off_hook(apps["off"])
    print(
        f"\nCPU per publish request, median of {args.rounds} rounds x {args.requests} requests "
        f"({args.concurrency} concurrent), {os.cpu_count()} cores:\n\n"
        "| messages per request | variant | us per request | us per message | vs off |\n"
        "|---:|---|---:|---:|---:|"
    )
    for messages in batches:
        off = statistics.median(results[("off", messages)])
        for variant in VARIANTS:
            median = statistics.median(results[(variant, messages)])
            print(
                f"| {messages} | {variant} | {median:.0f} | {median / messages:.1f} "
                f"| {median / off:.2f}x |"
            )
    print(f"\nthe switch a publish looks up when tracing is off: {hook:.0f} ns per request")


def _keys(batches: list[int]) -> list[tuple[str, int]]:
    return [(variant, messages) for messages in batches for variant in VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per variant a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", default="1,100", help="messages per request, comma separated")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    args = parser.parse_args()
    emulator = None
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        emulator = PubSubEmulator().start()
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        create_topics(PROJECT, [TOPIC])
        asyncio.run(main_async(args))
    finally:
        if emulator is not None:
            emulator.stop()


if __name__ == "__main__":
    main()
