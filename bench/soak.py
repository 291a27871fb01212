"""Soak: a bounded mixed load on loopgate, watching the workers' memory and file descriptors.

Starts its own Pub/Sub and storage emulators and loopgate (2 workers, authentication disabled) on
loopback, then for ``--minutes`` runs at once: publishers, websocket subscribers that connect,
read for a while and leave, SSE subscribers doing the same, and storage clients uploading,
downloading (checking the bytes) and deleting objects. Every few seconds it samples each worker's
VmRSS and open fd count from /proc. At the end it compares the samples of the minute after the
warm-up with those of the last minute, counts every answer by status (5xx must be zero), and
writes the "Soak" section of ``bench/RESULTS.md``. Run with ``python -m bench.soak --minutes 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from devtools.emulators import PubSubEmulator, StorageEmulator

from .harness import (
    Loopgate,
    commit,
    conditions,
    create_bucket,
    create_topics,
    open_fds,
    rss_kib,
    start_loopgate,
    write_section,
)

TOPICS = ("soak-a", "soak-b", "soak-c")
BUCKET = "soak"
WARMUP = 120.0  # seconds before the baseline is taken
SAMPLE_EVERY = 5.0
RSS_TOLERANCE_KIB = 10 * 1024  # "flat": the last minute's median within 10 MiB of the baseline
FD_TOLERANCE = 8  # ... and within 8 descriptors (each open connection holds one)
TIMEOUT = aiohttp.ClientTimeout(total=60)


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    published: int = 0
    delivered: int = 0
    ws_sessions: int = 0
    sse_sessions: int = 0
    uploads: int = 0
    downloads: int = 0
    corrupt: int = 0
    samples: list[tuple[float, int, dict[int, tuple[int, int]]]] = field(default_factory=list)

    def status(self, code: int) -> None:
        self.statuses[f"{code // 100}xx"] += 1
        if code >= 500:
            self.statuses[str(code)] += 1


async def run_loop(
    tally: Tally, kind: str, stop: float, body: Callable[[], Awaitable[None]]
) -> None:
    """Run ``body()`` repeatedly until ``stop``; a client-side error is counted, never raised."""
    while time.monotonic() < stop:
        try:
            await body()
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            tally.errors[f"{kind}: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.5)


async def soak(server: Loopgate, minutes: float, seed: int) -> Tally:
    tally = Tally()
    rng = random.Random(seed)
    started = time.monotonic()
    stop = started + minutes * 60
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as http:

        async def publish() -> None:
            topic = rng.choice(TOPICS)
            count = rng.choice((1, 1, 10, 50))
            data = base64.b64encode(os.urandom(rng.randint(16, 2048))).decode()
            url = f"{server.url}/v1/topics/{topic}:publish"
            async with http.post(url, json={"messages": [{"data": data}] * count}) as response:
                await response.read()
                tally.status(response.status)
                if response.status == 200:
                    tally.published += count
            await asyncio.sleep(rng.uniform(0.005, 0.05))

        async def websocket() -> None:
            topic = rng.choice(TOPICS)
            url = f"{server.url}/v1/topics/{topic}/stream"
            async with http.ws_connect(url, max_msg_size=0) as ws:
                tally.ws_sessions += 1
                leave = time.monotonic() + rng.uniform(0.5, 8)
                while (left := leave - time.monotonic()) > 0:
                    try:
                        msg = await asyncio.wait_for(ws.receive(), left)
                    except TimeoutError:
                        break
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        tally.errors[f"websocket: closed {ws.close_code}"] += 1
                        break
                    tally.delivered += msg.data.count('"messageId"')
            await asyncio.sleep(rng.uniform(0, 1))

        async def sse() -> None:
            topic = rng.choice(TOPICS)
            async with http.get(f"{server.url}/v1/topics/{topic}/events") as response:
                tally.status(response.status)
                tally.sse_sessions += 1
                leave = time.monotonic() + rng.uniform(0.5, 8)
                while (left := leave - time.monotonic()) > 0:
                    try:
                        line = await asyncio.wait_for(response.content.readline(), left)
                    except TimeoutError:
                        break
                    if not line:
                        tally.errors["sse: ended early"] += 1
                        break
            await asyncio.sleep(rng.uniform(0, 1))

        def storage(client: int) -> Callable[[], Awaitable[None]]:
            return lambda: storage_once(client)

        async def storage_once(client: int) -> None:
            # Each client has names of its own, so a download must match its upload exactly.
            name = f"c{client}/obj-{rng.randrange(10)}"
            size = rng.choice((1024, 64 * 1024, 512 * 1024, 6 * 1024 * 1024))
            data = os.urandom(size)
            url = f"{server.url}/v1/buckets/{BUCKET}/objects/{name}"
            async with http.put(url, data=data) as response:
                await response.read()
                tally.status(response.status)
                if response.status != 201:
                    return
                tally.uploads += 1
            async with http.get(url) as response:
                got = await response.read()
                tally.status(response.status)
                if response.status == 200:
                    tally.downloads += 1
                    if hashlib.md5(got).digest() != hashlib.md5(data).digest():
                        tally.corrupt += 1
            if rng.random() < 0.3:
                async with http.delete(url) as response:
                    await response.read()
                    tally.status(response.status)

        async def sample() -> None:
            while time.monotonic() < stop:
                workers = server.workers()
                per = {pid: (rss_kib(pid), open_fds(pid)) for pid in workers}
                tally.samples.append((time.monotonic() - started, len(workers), per))
                await asyncio.sleep(SAMPLE_EVERY)

        loops = [
            *(run_loop(tally, "publish", stop, publish) for _ in range(6)),
            *(run_loop(tally, "websocket", stop, websocket) for _ in range(20)),
            *(run_loop(tally, "sse", stop, sse) for _ in range(5)),
            *(run_loop(tally, "storage", stop, storage(n)) for n in range(2)),
            sample(),
        ]
        async with asyncio.timeout(minutes * 60 + 120):
            await asyncio.gather(*loops)
    return tally


def window(tally: Tally, start: float, end: float) -> dict[int, tuple[float, float]]:
    """Median (RSS KiB, fds) per worker over the samples taken in [start, end)."""
    per: dict[int, list[tuple[int, int]]] = {}
    for at, _, values in tally.samples:
        if start <= at < end:
            for pid, value in values.items():
                per.setdefault(pid, []).append(value)
    return {
        pid: (statistics.median(v[0] for v in vs), statistics.median(v[1] for v in vs))
        for pid, vs in per.items()
    }


def report(tally: Tally, minutes: float, wall: float, machine: str) -> tuple[list[str], bool]:
    total = minutes * 60
    base = window(tally, WARMUP, WARMUP + 60)
    last = window(tally, total - 60, total + 1)
    peaks: dict[int, tuple[int, int]] = {}
    for at, _, values in tally.samples:
        if at >= WARMUP:
            for pid, (rss, fds) in values.items():
                old = peaks.get(pid, (0, 0))
                peaks[pid] = (max(old[0], rss), max(old[1], fds))
    rows, flat = [], bool(base) and base.keys() == last.keys()
    for n, pid in enumerate(sorted(base), 1):
        (rss0, fd0), (rss1, fd1) = base[pid], last.get(pid, (0.0, 0.0))
        ok = abs(rss1 - rss0) <= RSS_TOLERANCE_KIB and abs(fd1 - fd0) <= FD_TOLERANCE
        flat = flat and ok
        rows.append(
            f"| worker {n} | {rss0 / 1024:.1f} | {rss1 / 1024:.1f} | {(rss1 - rss0) / 1024:+.1f} "
            f"| {peaks[pid][0] / 1024:.1f} | {fd0:.0f} | {fd1:.0f} | {peaks[pid][1]} "
            f"| {'yes' if ok else 'NO'} |"
        )
    fives = sum(v for k, v in tally.statuses.items() if k == "5xx")
    restarts = len({pid for _, _, values in tally.samples for pid in values}) - len(base)
    lines = [
        f"A {minutes:g}-minute mixed load on loopgate (2 Hypercorn workers, authentication "
        "disabled with `LOOPGATE_AUTH=disabled`), its own Pub/Sub and storage emulators, all on "
        "loopback: 6 publishers (1 to 50 messages of 16 B to 2 KiB per request, 3 topics), 20 "
        "websocket and 5 SSE subscribers each connecting, reading for 0.5 to 8 s and leaving, 2 "
        "storage clients uploading 1 KiB to 6 MiB, downloading and checking, sometimes deleting "
        "(10 object names each). Written by `python -m bench.soak --minutes "
        f"{minutes:g}`.",
        "",
        f"Workers' resident memory (VmRSS, MiB) and open fds (/proc/<pid>/fd), sampled every "
        f"{SAMPLE_EVERY:g} s: median of the minute after a {WARMUP / 60:g}-minute warm-up "
        "against the median of the last minute. Flat means within "
        f"{RSS_TOLERANCE_KIB // 1024} MiB and {FD_TOLERANCE} fds (fds follow the open "
        "connections, which vary with the churn).",
        "",
        "| | RSS after warm-up | RSS at end | change | RSS peak | fds after warm-up "
        "| fds at end | fds peak | flat |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- answers: {dict(sorted(tally.statuses.items()))}; 5xx: {fives}",
        f"- client-side errors: {dict(tally.errors) or 'none'}",
        f"- messages published {tally.published}, delivered to subscribers {tally.delivered}; "
        f"websocket sessions {tally.ws_sessions}, SSE sessions {tally.sse_sessions}; uploads "
        f"{tally.uploads}, downloads {tally.downloads}, corrupt downloads {tally.corrupt}",
        f"- workers replaced during the run: {restarts}",
        f"- result: {'PASS' if flat and fives == 0 and tally.corrupt == 0 else 'FAIL'} "
        f"(run took {wall:.0f} s)",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit()}",
        f"- machine: {machine}; load average {os.getloadavg()[0]:.2f} at the end",
    ]
    return lines, flat and fives == 0 and tally.corrupt == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (min)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = parser.parse_args()
    if args.minutes * 60 < WARMUP + 120:
        parser.error(f"--minutes must leave two minutes after the {WARMUP / 60:g}-minute warm-up")
    machine = conditions()
    pubsub, storage = PubSubEmulator(), StorageEmulator()
    server: Loopgate | None = None
    try:
        pubsub.start()
        storage.start()
        create_bucket(storage.url, BUCKET)
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        create_topics(pubsub.host, TOPICS)
        server = start_loopgate(
            {
                "LOOPGATE_AUTH": "disabled",
                "LOOPGATE_BUCKETS": BUCKET,
                "LOOPGATE_FANOUT_GRACE": "3",
                "PUBSUB_EMULATOR_HOST": pubsub.host,
                "STORAGE_EMULATOR_HOST": storage.url,
            }
        )
        began = time.monotonic()
        tally = asyncio.run(soak(server, args.minutes, args.seed))
        wall = time.monotonic() - began
        code = server.stop()
        lines, passed = report(tally, args.minutes, wall, machine)
        lines.append(f"- server exit status after SIGTERM: {code}")
    finally:
        if server is not None:
            server.stop()
        storage.stop()
        pubsub.stop()
    print("\n".join(lines))
    if not args.no_write:
        write_section("Soak", lines)
        print("\nwritten to bench/RESULTS.md")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
