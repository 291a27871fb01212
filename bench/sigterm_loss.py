"""SIGTERM mid-run: no publish answered 2xx is lost.

Starts its own Pub/Sub emulator and loopgate (2 workers, authentication disabled) on loopback,
publishes ``--requests`` one-message requests at ``--concurrency`` connections, sends SIGTERM to
the server once ``--signal-after`` of them were answered 2xx, keeps sending until every request
was tried, then reads a verification subscription: every message id answered 2xx must be there.
The other requests were answered 503 or had their connection closed or refused. Repeats
``--runs`` times (a fresh topic and server each) and writes the "SIGTERM mid-run" section of
``bench/RESULTS.md``. Run with ``python -m bench.sigterm_loss``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from devtools.emulators import PubSubEmulator

from .harness import PROJECT, commit, conditions, create_topics, start_loopgate, write_section

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass
class Run:
    outcomes: Counter[str] = field(default_factory=Counter)
    answered: set[str] = field(default_factory=set)
    received: set[str] = field(default_factory=set)
    exit_code: int | None = None
    exit_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def missing(self) -> int:
        return len(self.answered - self.received)


def classify(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "closed"  # ServerDisconnectedError, a reset (ClientOSError), a cut body


async def load(
    url: str, run: Run, args: argparse.Namespace, master: subprocess.Popen[bytes]
) -> None:
    """Publish; SIGTERM the master once enough were answered, and time its exit."""
    next_index = 0
    signalled: list[float] = []
    sent = asyncio.Event()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < args.requests:
            i = next_index
            next_index += 1
            data = base64.b64encode(b"loss-%d" % i).decode()
            try:
                async with session.post(url, json={"messages": [{"data": data}]}) as response:
                    if response.status == 200:
                        run.answered.update((await response.json())["messageIds"])
                    else:
                        await response.read()
                    run.outcomes[str(response.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.outcomes[classify(exc)] += 1
            if not signalled and len(run.answered) >= args.signal_after:
                signalled.append(time.monotonic())
                master.send_signal(signal.SIGTERM)
                sent.set()

    async def watch_exit() -> None:
        # The load goes on after the signal (refused from then on), so the exit is timed here.
        await sent.wait()
        await asyncio.to_thread(master.wait, 120)
        run.exit_seconds = time.monotonic() - signalled[0]

    watcher = asyncio.create_task(watch_exit())
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        async with asyncio.timeout(args.max_seconds):
            await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    if not signalled:  # too few answered: signal at the end so the run still ends
        signalled.append(time.monotonic())
        master.send_signal(signal.SIGTERM)
        sent.set()
    await watcher


def verify(subscription: str, run: Run, deadline: float) -> None:
    """Pull and ack the subscription until every answered id arrived, or nothing more comes."""
    from google.api_core.exceptions import DeadlineExceeded
    from google.cloud import pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline and time.monotonic() - quiet_since < 10:
            if run.answered <= run.received:
                break
            try:
                response = subscriber.pull(
                    request={"subscription": subscription, "max_messages": 1000}, timeout=5
                )
            except DeadlineExceeded:
                continue
            if not response.received_messages:
                continue
            quiet_since = time.monotonic()
            run.received.update(item.message.message_id for item in response.received_messages)
            subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [item.ack_id for item in response.received_messages],
                }
            )
    finally:
        subscriber.close()


def one_run(emulator: PubSubEmulator, n: int, args: argparse.Namespace) -> Run:
    topic, subscription = f"loss-{n}", f"loss-{n}-verify"
    create_topics(emulator.host, (topic,), subscription)
    server = start_loopgate(
        {"LOOPGATE_AUTH": "disabled", "PUBSUB_EMULATOR_HOST": emulator.host},
        workers=args.workers,
    )
    run = Run()
    began = time.monotonic()
    try:
        url = f"{server.url}/v1/topics/{topic}:publish"
        asyncio.run(load(url, run, args, server.process))
        run.exit_code = server.process.wait(60)
    finally:
        server.stop()
    run.seconds = time.monotonic() - began
    verify(f"projects/{PROJECT}/subscriptions/{subscription}", run, time.monotonic() + 120)
    return run


def table(runs: list[Run]) -> list[str]:
    lines = [
        "| run | requests | answered 2xx | 503 | other status | closed | refused | timeout "
        "| in subscription | missing | server exit | exit after SIGTERM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, run in enumerate(runs, 1):
        other = sum(v for k, v in run.outcomes.items() if k.isdigit() and k not in ("200", "503"))
        lines.append(
            f"| {n} | {sum(run.outcomes.values())} | {run.outcomes['200']} | "
            f"{run.outcomes['503']} | {other} | {run.outcomes['closed']} | "
            f"{run.outcomes['refused']} | {run.outcomes['timeout']} | {len(run.received)} | "
            f"**{run.missing}** | {run.exit_code} | {run.exit_seconds:.1f} s |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--signal-after", type=int, default=5_000, help="2xx answers first")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=300.0, help="bound of each load")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    machine = conditions()
    emulator = PubSubEmulator()
    runs: list[Run] = []
    try:
        emulator.start()
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        for n in range(args.runs):
            runs.append(one_run(emulator, n, args))
            print("\n".join(table(runs)[-1:]), flush=True)
    finally:
        emulator.stop()
    passed = all(run.missing == 0 and run.exit_code == 0 for run in runs)
    lines = [
        f"{args.requests} publish requests of one message each at {args.concurrency} connections "
        f"(aiohttp, loopback) to loopgate with {args.workers} workers (authentication disabled); "
        f"SIGTERM to the Hypercorn master once {args.signal_after} were answered 2xx; then every "
        "message id answered 2xx is looked up in a verification subscription. Written by "
        f"`python -m bench.sigterm_loss --runs {args.runs}`.",
        "",
        *table(runs),
        "",
        "- closed: the connection was closed or reset without an answer; refused: the server "
        'no longer accepted connections; neither was promised anything. "In subscription" '
        "counts every message that reached Pub/Sub: a few more than were answered 2xx, published "
        "but with the connection closed before the answer. Exit after SIGTERM: from the signal "
        "to the Hypercorn master's exit, timed while the load goes on.",
        f"- result: {'PASS' if passed else 'FAIL'}: no message answered 2xx is missing",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit()}",
        f"- machine: {machine}",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("SIGTERM mid-run", lines)
        print("\nwritten to bench/RESULTS.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
