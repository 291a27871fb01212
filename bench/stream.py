"""Websocket fan-out benchmark: deliveries per second and publish-to-receive latency on one worker.

Runs, side by side, at 100, 1,000 and 5,000 websocket clients of one Hypercorn worker:

* ``ceiling``: the same server with the hub fed by a timer in the worker (no Pub/Sub): the most one
  worker can deliver;
* ``pubsub``: the service as shipped: one Pub/Sub subscription per worker, fanned out;
* ``naive``: one Pub/Sub subscription and streaming pull per websocket (100 clients only unless
  ``--naive-all``: it falls over well before 1,000).

The offered load is ``--deliveries`` per second in all (messages per second = deliveries / clients).
Messages are published straight to the emulator from this process, so the server only fans out.
The load client is Node.js ``ws`` (bench/stream_client.js; ``npm install`` in bench/ first).
Also measures the worker's memory per idle connection. Everything runs on loopback and stops by itself.

    python -m bench.stream [--deliveries 50000] [--measure 8] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from devtools.servers import hypercorn_command, stop_process

from .harness import write_section

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


def start_server(mode: str, rate: float, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPGATE_")}
    env.update(
        {
            "LOOPGATE_PROJECT": PROJECT,
            "LOOPGATE_TOPICS": TOPIC,
            "LOOPGATE_AUTH": "disabled",  # the naive and ceiling servers have no auth either
            "LOOPGATE_STREAM_MAX_CONNECTIONS": "20000",
            "BENCH_TOPIC": TOPIC,
            "BENCH_RATE": str(rate),
            "PROMETHEUS_MULTIPROC_DIR": str(log.parent / f"metrics-{port}"),
            "LOOPGATE_STREAM_COMPRESSION": os.environ.get("BENCH_SERVER_COMPRESSION", "0"),
        }
    )
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            hypercorn_command(
                f"127.0.0.1:{port}",
                workers=1,
                app=APPS[mode],
                extra=[
                    "--backlog",
                    "8192",
                    "--error-logfile",
                    "-",
                    "--access-logfile",
                    "/dev/null",
                ],
            ),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{mode} server did not start; see {log}")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=40)


def worker_pid(master: int) -> int:
    """The Hypercorn worker among the master's children (not multiprocessing's resource tracker)."""
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise RuntimeError("no Hypercorn worker process found")


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
    process = subprocess.Popen(
        [
            "node",
            str(ROOT / "bench" / "stream_client.js"),
            url,
            str(clients),
            str(warmup),
            str(measure),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    result: dict[str, Any] = {}
    client_cpu = 0.0
    try:
        deadline = time.monotonic() + warmup + measure + 120
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
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return result


def one_run(
    mode: str, clients: int, deliveries: float, measure: float, out: Path
) -> dict[str, Any]:
    rate = deliveries / clients
    server, port = start_server(mode, rate, out / f"{mode}-{clients}.log")
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
    result.update(mode=mode, offered=deliveries, rate=rate, **memory)
    return result


def idle_memory(clients: int, out: Path) -> float:
    """KiB of worker memory per idle subscriber (no messages flowing)."""
    server, port = start_server("pubsub", 0, out / "idle.log")
    try:
        time.sleep(1)
        rss0 = worker_rss_kib(server)
        seen: dict[str, float] = {}

        def connected(event: dict[str, Any]) -> None:
            time.sleep(2)
            seen["kib"] = (worker_rss_kib(server) - rss0) / max(1, event["open"])

        run_client(f"ws://127.0.0.1:{port}/v1/topics/{TOPIC}/stream", clients, 0.1, 0.1, connected)
    finally:
        stop_server(server)
    return seen.get("kib", float("nan"))


def conditions() -> str:
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
        f"{platform.python_version()}, Node {node}; Pub/Sub emulator on loopback; one Hypercorn "
        "worker (uvloop); load client: one Node.js process; all on the same machine."
    )


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| design | clients | offered/s | delivered/s | p50 ms | p99 ms | max ms | dropped | open "
        "| worker CPU | CPU µs/delivery | client CPU | KiB/conn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        kib = r.get("per_connection_kib")
        cpu, per, client = r.get("worker_cpu"), r.get("cpu_us_per_delivery"), r.get("client_cpu")
        lines.append(
            f"| {r['mode']} | {r['clients']} | {r['offered']:.0f} | {r.get('per_second', 0):.0f} | "
            f"{r.get('p50_ms')} | {r.get('p99_ms')} | {r.get('max_ms')} | {r.get('dropped', 0)} | "
            f"{r.get('open')}/{r['clients']} | {'' if cpu is None else f'{cpu:.0%}'} | "
            f"{'' if per is None else f'{per:.1f}'} | {'' if client is None else f'{client:.0%}'} | "
            f"{'' if kib is None else f'{kib:.1f}'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deliveries", type=float, default=50_000)
    parser.add_argument("--measure", type=float, default=8.0)
    parser.add_argument("--clients", default="100,1000,5000")
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
        "--write", action="store_true", help="replace the Streams section of bench/RESULTS.md"
    )
    args = parser.parse_args()
    if args.write and (args.offer_compression or args.compression):
        parser.error("--write records the default setup: run the compression variants without it")
    # Read by the load client and by start_server.
    os.environ["BENCH_OFFER_DEFLATE"] = "1" if args.offer_compression else "0"
    os.environ["BENCH_SERVER_COMPRESSION"] = "1" if args.compression else "0"
    sys.path.insert(0, str(ROOT))
    from devtools.emulators import PubSubEmulator

    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    header = conditions()
    emulator = PubSubEmulator().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    results: list[dict[str, Any]] = []
    try:
        from google.cloud import pubsub_v1

        admin = pubsub_v1.PublisherClient()
        admin.create_topic(name=admin.topic_path(PROJECT, TOPIC))
        admin.stop()
        for clients in [int(c) for c in args.clients.split(",")]:
            for mode in args.modes.split(","):
                if mode == "naive" and clients > 100 and not args.naive_all:
                    continue
                result = one_run(mode, clients, args.deliveries, args.measure, out)
                print(json.dumps(result), flush=True)
                results.append(result)
        idle = idle_memory(args.idle, out) if args.idle else float("nan")
        print(json.dumps({"idle_kib_per_connection": idle}), flush=True)
    finally:
        emulator.stop()
    report = (
        f"Conditions: {header}\n\nOffered load {args.deliveries:.0f} deliveries/s, "
        f"measured over {args.measure:g} s after a 3 s warm-up.\n\n{table(results)}\n\n"
        f"Idle memory: {idle:.1f} KiB per connection ({args.idle:,} idle websockets, worker RSS).\n"
    )
    print(report)
    if args.write:
        write_section(
            "Streams",
            [
                f"`python -m bench.stream --measure {args.measure:g} --write`",
                "",
                *report.splitlines(),
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
