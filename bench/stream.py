"""Websocket fan-out benchmark: deliveries per second and publish-to-receive latency on one worker.

Runs, side by side, at 100, 1,000 and 5,000 websocket clients of one worker of each server named
by ``--server`` (Hypercorn by default; uvicorn and granian with the command lines of
``devtools/servers.py``):

* ``ceiling``: the same server with the hub fed by a timer in the worker (no Pub/Sub): the most one
  worker can deliver;
* ``pubsub``: the service as shipped: one Pub/Sub subscription per worker, fanned out;
* ``naive``: one Pub/Sub subscription and streaming pull per websocket (100 clients only unless
  ``--naive-all``: it falls over well before 1,000).

The offered load is ``--deliveries`` per second in all (messages per second = deliveries / clients).
Messages are published straight to the emulator from this process, so the server only fans out.
The load client is Node.js ``ws`` (bench/stream_client.js; ``npm install`` in bench/ first).
Also measures the worker's memory per idle connection (``--idle``, 10,000 for the one-worker
target). Everything runs on loopback and stops by itself; every process it starts is stopped by PID.

    python -m bench.stream [--server hypercorn,uvicorn,granian] [--deliveries 50000] [--measure 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from devtools.servers import SERVERS, server_command

from .harness import node_client_ready, write_section
from .procs import stop_tree

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "loopgate-bench"
TOPIC = "bench-stream"
APPS = {
    "ceiling": "bench.stream_app:ceiling_app()",
    "pubsub": "service:create_app()",
    "naive": "bench.stream_app:naive_app()",
}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


BACKLOG = 8192
# Descriptors each process needs besides one per connection (its own files, the emulator's channel).
SPARE_FDS = 256


def server_extra(server: str) -> list[str]:
    """What this benchmark adds to the server's documented command line: a deeper backlog, so that
    thousands of clients connecting at once are not refused; for Hypercorn its logs on stdout.
    (Granian's ``--backpressure`` limits requests in progress, not open websockets: one worker
    with ``--backpressure 20`` held and fed 50.)"""
    if server == "hypercorn":
        return [
            "--backlog", str(BACKLOG), "--error-logfile", "-", "--access-logfile", "/dev/null",
        ]  # fmt: skip
    return ["--backlog", str(BACKLOG)]


def start_server(
    mode: str, server: str, rate: float, log: Path, max_connections: int
) -> tuple[subprocess.Popen[bytes], int]:
    """Serve ``mode``'s app with one worker of ``server``; returns once it answers ``/healthz``."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPGATE_")}
    env.update(
        {
            "LOOPGATE_PROJECT": PROJECT,
            "LOOPGATE_TOPICS": TOPIC,
            "LOOPGATE_AUTH": "disabled",  # the naive and ceiling servers have no auth either
            "LOOPGATE_STREAM_MAX_CONNECTIONS": str(max(20_000, 2 * max_connections)),
            "BENCH_TOPIC": TOPIC,
            "BENCH_RATE": str(rate),
            "PROMETHEUS_MULTIPROC_DIR": str(log.parent / f"metrics-{port}"),
            "LOOPGATE_STREAM_COMPRESSION": os.environ.get("BENCH_SERVER_COMPRESSION", "0"),
        }
    )
    # --set LOOPGATE_X=Y: settings of the loopgate server under test (see the README's settings).
    env.update(json.loads(os.environ.get("BENCH_SERVER_SETTINGS", "{}")))
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            server_command(
                server,
                f"127.0.0.1:{port}",
                workers=1,
                app=APPS[mode],
                extra=server_extra(server),
            ),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{mode} server ({server}) exited at start; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process, port
        except OSError:
            time.sleep(0.2)
    stop_server(process)
    raise RuntimeError(f"{mode} server ({server}) did not start within 60 s; see {log}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    stop_tree(process, timeout=40)


def worker_pid(master: int) -> int:
    """The one worker serving: the master's child that is not multiprocessing's resource tracker
    (Hypercorn spawns its worker, granian forks it), or the master itself when it has none (uvicorn
    with one worker serves in its own process)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    workers = [
        int(child)
        for child in children
        if b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    if len(workers) > 1:
        raise RuntimeError(f"expected one worker under {master}, found {workers}")
    return workers[0] if workers else master


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds process ``pid`` has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    return cpu_seconds(worker_pid(process.pid))


def worker_rss_kib(process: subprocess.Popen[bytes]) -> int:
    pid = worker_pid(process.pid)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_fds(process: subprocess.Popen[bytes]) -> int:
    """Open file descriptors of the worker: one per connection it holds, besides its own."""
    return len(os.listdir(f"/proc/{worker_pid(process.pid)}/fd"))


def raise_fd_limit(connections: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (which every process it starts inherits) to what
    ``connections`` need, up to the hard limit; returns the (soft, hard) limits now in force.

    Raises:
        RuntimeError: the hard limit is too low for ``connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + SPARE_FDS
    if hard != resource.RLIM_INFINITY and hard < want:
        raise RuntimeError(
            f"{connections:,} connections need {want:,} open files per process; this machine "
            f"allows {hard:,} (ulimit -Hn): raise it, or ask for fewer clients"
        )
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft, hard


class Publisher(threading.Thread):
    """Publishes ``rate`` messages per second to the emulator until stopped."""

    def __init__(self, rate: float) -> None:
        super().__init__(daemon=True)
        from google.cloud import pubsub_v1

        self.client = pubsub_v1.PublisherClient(
            batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.005)
        )
        self.path = self.client.topic_path(PROJECT, TOPIC)
        self.rate = rate
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop_event.wait(0.01):
            due = int((time.monotonic() - start) * self.rate) - self.sent
            for _ in range(max(0, due)):
                self.client.publish(self.path, b"x" * 64)
            self.sent += max(0, due)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.client.stop()


def run_client(
    url: str,
    clients: int,
    warmup: float,
    measure: float,
    on_connected: Any = None,
    on_measuring: Any = None,
) -> dict[str, Any]:
    connect = max(60.0, clients / 100)  # seconds the client waits for every connection to open
    errors = tempfile.TemporaryFile("w+")  # what the client says on stderr, for a failed run
    process = subprocess.Popen(
        [
            "node",
            str(ROOT / "bench" / "stream_client.js"),
            url,
            str(clients),
            str(warmup),
            str(measure),
            str(connect),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    assert process.stdout is not None
    result: dict[str, Any] = {}
    client_cpu = 0.0
    # Bounded even if the client hangs without a line: kill it (by its PID) past the deadline.
    watchdog = threading.Timer(connect + warmup + measure + 60, process.kill)
    watchdog.start()
    try:
        deadline = time.monotonic() + connect + warmup + measure + 60
        for line in process.stdout:
            event = json.loads(line)
            if event["event"] == "connected" and on_connected is not None:
                on_connected(event)
            if event["event"] == "measuring":
                client_cpu = cpu_seconds(process.pid)
                if on_measuring is not None:
                    on_measuring()
            if event["event"] == "result":
                result = event
                if client_cpu:
                    used = cpu_seconds(process.pid) - client_cpu
                    result["client_cpu"] = used / event["seconds"]
                break
            if time.monotonic() > deadline:
                break
    finally:
        watchdog.cancel()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        errors.seek(0)
        said = errors.read()[-2000:]
        errors.close()
    if not result:
        raise RuntimeError(f"the load client gave no result (exit {process.returncode}): {said}")
    return result


def one_run(
    mode: str, server_name: str, clients: int, deliveries: float, measure: float, out: Path
) -> dict[str, Any]:
    rate = deliveries / clients
    log = out / f"{mode}-{server_name}-{clients}.log"
    server, port = start_server(mode, server_name, rate, log, clients)
    publisher = None
    path = "/naive" if mode == "naive" else "/v1/topics"
    memory: dict[str, Any] = {}
    cpu: dict[str, float] = {}
    try:
        rss0 = worker_rss_kib(server)

        def measuring() -> None:
            cpu["start"] = worker_cpu_seconds(server)

        if mode != "ceiling":

            def connected(event: dict[str, Any]) -> None:
                memory["per_connection_kib"] = (worker_rss_kib(server) - rss0) / max(
                    1, event["open"]
                )
                nonlocal publisher
                publisher = Publisher(rate)
                publisher.start()
        else:

            def connected(event: dict[str, Any]) -> None:
                memory["per_connection_kib"] = None
                # The timer starts only now, like the publisher of the other designs.
                urllib.request.urlopen(
                    urllib.request.Request(f"http://127.0.0.1:{port}/bench/start", method="POST"),
                    timeout=30,
                ).close()

        result = run_client(
            f"ws://127.0.0.1:{port}{path}/{TOPIC}/stream",
            clients,
            3.0,
            measure,
            connected,
            measuring,
        )
        if "start" in cpu and result.get("delivered"):
            used = worker_cpu_seconds(server) - cpu["start"]
            result["worker_cpu"] = used / result["seconds"]
            result["cpu_us_per_delivery"] = used / result["delivered"] * 1e6
    finally:
        if publisher is not None:
            publisher.stop()
        stop_server(server)
    result.update(mode=mode, server=server_name, offered=deliveries, rate=rate, **memory)
    return result


def idle_memory(server_name: str, clients: int, out: Path) -> dict[str, Any]:
    """How one worker holds ``clients`` idle subscribers (no messages flowing): how many the
    client opened, the worker's descriptors and KiB of memory per connection while all are held."""
    server, port = start_server("pubsub", server_name, 0, out / f"idle-{server_name}.log", clients)
    seen: dict[str, Any] = {"server": server_name, "clients": clients}
    try:
        time.sleep(1)
        rss0, fds0 = worker_rss_kib(server), worker_fds(server)

        def connected(event: dict[str, Any]) -> None:
            # The client holds every connection for the warm-up below: read the worker meanwhile.
            time.sleep(2)
            seen.update(open=event["open"], failed=event["failed"])
            seen["held"] = worker_fds(server) - fds0
            seen["kib"] = (worker_rss_kib(server) - rss0) / max(1, event["open"])

        run_client(f"ws://127.0.0.1:{port}/v1/topics/{TOPIC}/stream", clients, 5.0, 0.1, connected)
    finally:
        stop_server(server)
    return seen


def conditions(servers: str, soft: int, hard: int) -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), load average before the run {load}; Python "
        f"{platform.python_version()}, Node {node}; Pub/Sub emulator on loopback; one worker of "
        f"{servers} (uvloop); load client: one Node.js process; open files limit {soft:,} "
        f"(hard {hard:,}); all on the same machine."
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| design | server | clients | offered/s | delivered/s | p50 ms | p99 ms | max ms | dropped "
        "| open | worker CPU | CPU µs/delivery | client CPU | KiB/conn |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        kib = r.get("per_connection_kib")
        cpu, per, client = r.get("worker_cpu"), r.get("cpu_us_per_delivery"), r.get("client_cpu")
        lines.append(
            f"| {r['mode']} | {r['server']} | {r['clients']} | {r['offered']:.0f} "
            f"| {r.get('per_second', 0):.0f} | "
            f"{r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('max_ms')} | {r.get('dropped', 0)} | "
            f"{r.get('open')}/{r['clients']} | {'' if cpu is None else f'{cpu:.0%}'} | "
            f"{'' if per is None else f'{per:.1f}'} | {'' if client is None else f'{client:.0%}'} | "
            f"{'' if kib is None else f'{kib:.1f}'} |"
        )
    return "\n".join(lines)


def parse_servers(value: str) -> list[str]:
    """``--server``: one of :data:`~devtools.servers.SERVERS`, or several comma-separated."""
    servers = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in servers if name not in SERVERS]
    if unknown or not servers:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(SERVERS)} (comma-separated)")
    return list(dict.fromkeys(servers))


def idle_line(idle: dict[str, Any]) -> str:
    return (
        f"- {idle['server']}: {idle.get('open', 0):,} of {idle['clients']:,} open "
        f"({idle.get('failed', 0):,} failed), the worker holding {idle.get('held', 0):,} more "
        f"descriptors than before, {idle.get('kib', float('nan')):.1f} KiB per connection"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--server",
        type=parse_servers,
        default=["hypercorn"],
        help="server(s) for every design, comma-separated (runs interleaved): "
        + ", ".join(SERVERS),
    )
    parser.add_argument("--deliveries", type=float, default=50_000)
    parser.add_argument("--measure", type=float, default=8.0)
    parser.add_argument(
        "--clients", default="100,1000,5000", help="comma-separated counts (0: only --idle)"
    )
    parser.add_argument("--naive-all", action="store_true")
    parser.add_argument("--modes", default="ceiling,pubsub,naive", help="designs to run")
    parser.add_argument(
        "--idle", type=int, default=5000, help="idle websockets for the memory measure (0: skip)"
    )
    parser.add_argument(
        "--offer-compression",
        action="store_true",
        help="clients offer permessage-deflate, as browsers do",
    )
    parser.add_argument(
        "--compression",
        action="store_true",
        help="the server accepts permessage-deflate (LOOPGATE_STREAM_COMPRESSION=1)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LOOPGATE_NAME=VALUE",
        help="a loopgate setting for the servers under test (repeatable)",
    )
    parser.add_argument(
        "--write", action="store_true", help="replace the Streams section of bench/RESULTS.md"
    )
    args = parser.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    if any(not name.startswith("LOOPGATE_") for name in settings):
        parser.error("--set takes LOOPGATE_NAME=VALUE")
    if args.write and settings:
        parser.error("--write records the default setup: run --set variants without it")
    if args.write and (args.offer_compression or args.compression):
        parser.error("--write records the default setup: run the compression variants without it")
    modes = [mode for mode in args.modes.split(",") if mode]
    if not modes or set(modes) - set(APPS):
        parser.error(f"--modes: choose from {', '.join(APPS)}")
    problem = node_client_ready()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    clients_list = [int(c) for c in args.clients.split(",") if int(c or 0) > 0]
    try:
        soft, hard = raise_fd_limit(max([*clients_list, args.idle]))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # Read by the load client and by start_server.
    os.environ["BENCH_OFFER_DEFLATE"] = "1" if args.offer_compression else "0"
    os.environ["BENCH_SERVER_COMPRESSION"] = "1" if args.compression else "0"
    os.environ["BENCH_SERVER_SETTINGS"] = json.dumps(settings)
    sys.path.insert(0, str(ROOT))
    from devtools.emulators import PubSubEmulator

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    header = conditions(", ".join(args.server), soft, hard)
    emulator = PubSubEmulator().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    results: list[dict[str, Any]] = []
    idles: list[dict[str, Any]] = []
    try:
        from google.cloud import pubsub_v1

        admin = pubsub_v1.PublisherClient()
        admin.create_topic(name=admin.topic_path(PROJECT, TOPIC))
        admin.stop()
        for clients in clients_list:
            for mode in modes:
                if mode == "naive" and clients > 100 and not args.naive_all:
                    continue
                for server in args.server:  # interleaved: each design under every server in turn
                    result = one_run(mode, server, clients, args.deliveries, args.measure, out)
                    print(json.dumps(result), flush=True)
                    results.append(result)
        for server in args.server if args.idle else []:
            idles.append(idle_memory(server, args.idle, out))
            print(json.dumps({"idle": idles[-1]}), flush=True)
    finally:
        emulator.stop()
    report = (
        f"Conditions: {header}\n\nOffered load {args.deliveries:.0f} deliveries/s, "
        f"measured over {args.measure:g} s after a 3 s warm-up.\n\n{table(results)}\n"
    )
    if args.offer_compression:
        report += "".join(
            f"\n{r['mode']} ({r['server']}, {r['clients']} clients): permessage-deflate "
            f"negotiated on {r.get('deflated', 0)} of {r.get('open')} connections"
            for r in results
        )
        report += "\n"
    if idles:
        report += (
            f"\nIdle: {args.idle:,} idle websockets on one worker (no messages), read from the "
            "worker's /proc while the client held them all:\n"
            + "\n".join(idle_line(idle) for idle in idles)
            + "\n"
        )
    print(report)
    if args.write:
        write_section(
            "Streams",
            [
                f"`python -m bench.stream {' '.join(sys.argv[1:])}`",
                "",
                *report.splitlines(),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
