"""Cloud Storage throughput: objects up and down through loopgate, next to the same transfers made
through a bare proxy (the cost of the hop itself), through the same proxy written as two plain
Quart routes (what Quart itself adds) and directly against the emulator with gcloud-aio-storage
(the ceiling), in one run.

Starts its own storage emulator and three Hypercorn servers of one worker each (loopgate, the
bare proxy of ``bench/apps/storage_proxy.py`` and the Quart proxy of
``bench/apps/storage_quart.py``) on loopback, runs a bounded number of
interleaved transfers per size, prints a table and writes it to the "Storage" section of
``bench/RESULTS.md``. Run with ``python -m bench.storage`` (options: ``--help``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from gcloud.aio.storage import Storage

from devtools.emulators import StorageEmulator
from service import malloctune
from service.auth.tokens import entry_toml, new_token

from .harness import Loopgate, commit, create_bucket, start_server, write_section

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
MB = 1024 * 1024
BUCKET = "bench"
SIZES = {1 * MB: 100, 50 * MB: 8}  # object size -> repetitions per direction and path
CONCURRENCY = (1, 4)  # transfers at once: one at a time (latency), and several (throughput)
Key = tuple[int, int, str, str]  # (size, transfers at once, path, direction)
Transfer = Callable[[str, Any], Awaitable[None]]  # (object name, data or size)
DEADLINE = 600.0  # the whole run stops after this many seconds
OP_TIMEOUT = 120.0
PROXY = "bench.apps.storage_proxy:app"
QUART_PROXY = "bench.apps.storage_quart:app"
TARGET = 0.9  # loopgate's share of the bare proxy's MB/s
# Rounds, each on servers started afresh: on a shared machine one process can run a steady 10%
# faster or slower than another running the same code, for as long as it lives, so one round's
# ratios say as much about the processes as about the code.
ROUNDS = 3
# The proxies run with the allocator settings loopgate gives itself (service/malloctune.py), set the
# way any process can have them: without, whether a worker faults in fresh pages for every chunk
# depends on its heap's history, and a proxy's result on its luck.
PEER_ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(malloctune.MMAP_THRESHOLD),
    "MALLOC_TRIM_THRESHOLD_": str(malloctune.TRIM_THRESHOLD),
}


@dataclass
class Series:
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # worker CPU seconds per transfer (10 ms ticks)
    faults: list[float] = field(default_factory=list)  # worker minor page faults per transfer

    def mb_per_s(self, size: int) -> float:
        return size / MB / statistics.median(self.seconds)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def busy_seconds() -> float:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> list[int]:
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            pids += family(int(child))
    return pids


async def _all(operations: Iterable[Awaitable[None]]) -> None:
    await asyncio.gather(*operations)


async def timed(operation: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await asyncio.wait_for(operation(), OP_TIMEOUT)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Server:
    """A server the transfers go through: its address, worker PID and request headers."""

    base: str
    worker: int
    headers: dict[str, str]


async def measure(
    servers: dict[str, Server], emulator: StorageEmulator, concurrency: tuple[int, ...]
) -> dict[Key, Series]:
    results: dict[Key, Series] = {}
    deadline = time.monotonic() + DEADLINE
    timeout = aiohttp.ClientTimeout(total=None, sock_read=OP_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        storage = Storage(session=http, api_root=emulator.url, api_is_dev=True)  # type: ignore[arg-type]

        def through(server: Server) -> tuple[Transfer, Transfer]:
            def object_url(name: str) -> str:
                return f"{server.base}/v1/buckets/{BUCKET}/objects/{name}"

            async def up(name: str, data: bytes) -> None:
                headers = {**server.headers, "Content-Type": "application/octet-stream"}
                async with http.put(object_url(name), data=io.BytesIO(data), headers=headers) as r:
                    assert r.status == 201, await r.text()
                    await r.read()

            async def down(name: str, size: int) -> None:
                received = 0
                async with http.get(object_url(name), headers=server.headers) as response:
                    assert response.status == 200, await response.text()
                    async for chunk in response.content.iter_chunked(256 * 1024):
                        received += len(chunk)
                assert received == size

            return up, down

        async def direct_up(name: str, data: bytes) -> None:
            await storage.upload(
                BUCKET, name, data, content_type="application/octet-stream", timeout=int(OP_TIMEOUT)
            )

        async def direct_down(name: str, size: int) -> None:
            assert len(await storage.download(BUCKET, name, timeout=int(OP_TIMEOUT))) == size

        paths: dict[str, tuple[Transfer, Transfer]] = {
            name: through(server) for name, server in servers.items()
        }
        paths["direct"] = (direct_up, direct_down)
        for size, repetitions in SIZES.items():
            data = os.urandom(size)
            for path, (up, down) in paths.items():  # warm-up, not measured
                await up(f"{path}-{size}-0", data)
                await down(f"{path}-{size}-0", size)
            for at_once in concurrency:
                for _ in range(max(1, repetitions // at_once)):
                    for path, (up, down) in paths.items():
                        if time.monotonic() > deadline:
                            return results
                        names = [f"{path}-{size}-{i}" for i in range(at_once)]
                        for direction, operation in (
                            (
                                "up",
                                lambda up=up, names=names, data=data: _all(
                                    up(n, data) for n in names
                                ),
                            ),
                            (
                                "down",
                                lambda down=down, names=names, size=size: _all(
                                    down(n, size) for n in names
                                ),
                            ),
                        ):
                            series = results.setdefault((size, at_once, path, direction), Series())
                            worker = servers[path].worker if path in servers else None
                            cpu = cpu_seconds(worker) if worker else 0.0
                            faults = minor_faults(worker) if worker else 0
                            # Seconds per transfer: the batch's time shared by its transfers.
                            series.seconds.append(await timed(operation) / at_once)
                            if worker:
                                series.cpu.append((cpu_seconds(worker) - cpu) / at_once)
                                series.faults.append((minor_faults(worker) - faults) / at_once)
    return results


def targets(results: dict[Key, Series], concurrency: tuple[int, ...]) -> list[str]:
    lines = []
    for at_once in concurrency:
        for size in SIZES:
            for direction in ("up", "down"):
                through = results.get((size, at_once, "loopgate", direction))
                bare = results.get((size, at_once, "proxy", direction))
                framework = results.get((size, at_once, "quart", direction))
                if through and bare:
                    ratio = through.mb_per_s(size) / bare.mb_per_s(size)
                    verdict = "met" if ratio >= TARGET else "NOT met"
                    peer = ""
                    if framework:
                        quart = framework.mb_per_s(size) / bare.mb_per_s(size)
                        peer = f" (the Quart proxy: {quart:.1%})"
                    lines.append(
                        f"- {size // MB} MB {direction}, {_at_once(at_once)}: {ratio:.1%} "
                        f"-> {verdict}{peer}"
                    )
    return lines


def _at_once(count: int) -> str:
    return "one at a time" if count == 1 else f"{count} at once"


def _cpu_per_mb(series: Series, size: int) -> str:
    return f"{sum(series.cpu) * 1000 / (len(series.cpu) * size / MB):.1f}"


def _faults_per_mb(series: Series, size: int) -> str:
    return f"{sum(series.faults) / (len(series.faults) * size / MB):.0f}"


def table(results: dict[Key, Series], concurrency: tuple[int, ...]) -> list[str]:
    lines = [
        "| object | transfers | direction | loopgate MB/s | Quart proxy MB/s | bare proxy MB/s "
        "| direct MB/s | loopgate / bare proxy | Quart proxy / bare proxy | loopgate / Quart proxy "
        "| bare proxy / direct | worker CPU ms/MB, loopgate / Quart / bare "
        "| worker page faults per MB, loopgate / Quart / bare | samples each |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for at_once in concurrency:
        for size in SIZES:
            for direction in ("up", "down"):
                ours = results.get((size, at_once, "loopgate", direction))
                framework = results.get((size, at_once, "quart", direction))
                bare = results.get((size, at_once, "proxy", direction))
                direct = results.get((size, at_once, "direct", direction))
                if not ours or not framework or not bare or not direct:
                    continue
                mine, quart, hop, ceiling = (
                    s.mb_per_s(size) for s in (ours, framework, bare, direct)
                )
                cpu = " / ".join(_cpu_per_mb(s, size) for s in (ours, framework, bare))
                faults = " / ".join(_faults_per_mb(s, size) for s in (ours, framework, bare))
                lines.append(
                    f"| {size // MB} MB | {_at_once(at_once)} | {direction} | {mine:.1f} "
                    f"| {quart:.1f} | {hop:.1f} | {ceiling:.1f} | {mine / hop:.0%} "
                    f"| {quart / hop:.0%} | {mine / quart:.0%} | {hop / ceiling:.0%} | {cpu} "
                    f"| {faults} | {len(ours.seconds)} |"
                )
    return lines


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def one_round(
    emulator: StorageEmulator, token: str, token_file: Path, concurrency: tuple[int, ...]
) -> tuple[dict[Key, Series], float]:
    """One round on servers of its own: the results, and the cores other processes used."""
    started: list[Loopgate] = []
    try:
        loopgate_env = {
            "LOOPGATE_BUCKETS": BUCKET,
            "LOOPGATE_EAGER": "false",
            "LOOPGATE_AUTH_FILE": str(token_file),
            "STORAGE_EMULATOR_HOST": emulator.url,
        }
        # No Pub/Sub here: /readyz would wait for it; /healthz says the worker serves.
        started.append(start_server(loopgate_env, probe="/healthz", workers=1))
        # The proxies have no health route: any answer (a 404) means it serves.
        proxy_env = {"STORAGE_EMULATOR_HOST": emulator.url, **PEER_ALLOCATOR}
        for app in (PROXY, QUART_PROXY):
            started.append(start_server(proxy_env, app=app, probe="/", any_answer=True, workers=1))
        loopgate, proxy, quart = started
        auth = {"Authorization": f"Bearer {token}"}
        servers = {
            "loopgate": Server(loopgate.url, loopgate.workers()[0], auth),
            "proxy": Server(proxy.url, proxy.workers()[0], {}),
            "quart": Server(quart.url, quart.workers()[0], {}),
        }
        assert emulator.process is not None
        ours = [os.getpid(), *family(emulator.process.pid)]
        for server in started:
            ours += family(server.process.pid)
        cpu_before = {pid: cpu_seconds(pid) for pid in ours}
        busy_before, wall_before = busy_seconds(), time.monotonic()
        results = asyncio.run(measure(servers, emulator, concurrency))
        wall = time.monotonic() - wall_before
        busy = busy_seconds() - busy_before
        used = {pid: cpu_seconds(pid) - before for pid, before in cpu_before.items()}
        return results, max(0.0, busy - sum(used.values())) / wall
    finally:
        for server in started:
            server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument(
        "--concurrency",
        default=",".join(map(str, CONCURRENCY)),
        help="transfers at once, comma separated (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help="rounds, each on servers started afresh (default: %(default)s)",
    )
    args = parser.parse_args()
    concurrency = tuple(int(c) for c in args.concurrency.split(",") if c)

    malloctune.settle()  # the load client's own chunks, alike in every round
    emulator = StorageEmulator()
    emulator.start()
    scratch = tempfile.TemporaryDirectory(prefix="loopgate-bench-")
    results: dict[Key, Series] = {}
    others: list[float] = []
    load_before = os.getloadavg()[0]
    wall_before = time.monotonic()
    try:
        create_bucket(emulator.url, BUCKET)
        token = new_token()
        token_file = Path(scratch.name) / "tokens.toml"
        scopes = [f"storage:read:{BUCKET}", f"storage:write:{BUCKET}"]
        token_file.write_text(entry_toml("bench", token, scopes))
        for _ in range(args.rounds):
            round_results, round_others = one_round(emulator, token, token_file, concurrency)
            others.append(round_others)
            for key, series in round_results.items():
                merged = results.setdefault(key, Series())
                merged.seconds += series.seconds
                merged.cpu += series.cpu
                merged.faults += series.faults
    finally:
        emulator.stop()
        scratch.cleanup()
    wall = time.monotonic() - wall_before

    lines = [
        "Object transfers through loopgate (one Hypercorn worker), through a bare proxy (one "
        "Hypercorn worker running a framework-free ASGI app that only moves the bytes over "
        "aiohttp: `bench/apps/storage_proxy.py`, what the extra hop itself costs), through the "
        "same proxy as two plain Quart routes (`bench/apps/storage_quart.py`: what Quart itself "
        "adds, which no Quart app avoids) and made "
        "directly against the storage emulator with gcloud-aio-storage (the ceiling), "
        "interleaved, loopback only: one transfer at a time (each transfer's own speed), and "
        "several at once (what the setup moves together); MB/s is the object's size over the "
        "median time per transfer, a batch's time shared by its transfers (MB = 2^20 bytes), "
        f"over {args.rounds} rounds, each on servers started afresh. Written by "
        "`python -m bench.storage`.",
        "",
        *table(results, concurrency),
        "",
        f"Target: loopgate at least {TARGET:.0%} of the bare proxy (same run):",
        *targets(results, concurrency),
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit()}; "
        f"run took {wall:.0f} s",
        f"- machine: nproc {os.cpu_count()}, {cpu_model()}; load average {load_before:.2f} at "
        f"start; other processes used {max(others):.2f} cores on average while measuring "
        f"(the most of the {len(others)} rounds)",
        "- the emulator is gcp-storage-emulator (single-threaded, in memory): it bounds every "
        "column; it closes its connection after every request, so each backend request "
        "also pays a TCP connect",
        "- loopgate requests carry an API token (authentication on, as in production); the "
        "proxies check nothing",
        "- loopgate sets glibc's allocator thresholds itself (`service/malloctune.py`); the "
        "proxies are started with the same ones (`MALLOC_MMAP_THRESHOLD_`, "
        "`MALLOC_TRIM_THRESHOLD_`), so that no worker's result depends on its heap's history",
    ]
    print("\n".join(lines))
    if not args.no_write:
        write_section("Storage", lines)
        print(f"\nwritten to {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
