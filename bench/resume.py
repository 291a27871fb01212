"""Resume after a deploy: websocket subscribers on an instance that gets SIGTERM reconnect to
another instance and catch up, with nothing missing.

Starts its own Pub/Sub emulator, a topic with one hour of message retention, and two loopgate
instances A and B on loopback (``--server``, ``--workers`` each; authentication off). The load
client (``bench/resume_client.js``, Node.js ``ws``; ``npm install`` in bench/ first) opens
``--clients`` websockets to A and publishes ``--rate`` messages per second through B, one per
request. After ``--warmup`` seconds this process sends SIGTERM to A's master, as a rolling deploy
does: A closes every websocket with 1001 and each client reconnects to B at once with
``?lastEventId=`` its last message's id. B has no subscriber of the topic before that moment, so
its worker creates its fan-out subscription and one catch-up subscription for the whole storm.

Measured per run: the time from A's first close until every client holds every message answered
200 before its new connection was subscribed ("caught up"), the messages replayed per second over
that time, and, once publishing has stopped ``--after`` seconds after the close, the messages
answered 200 that a client never received (must be 0) and the duplicates. Medians of ``--runs``
runs (a fresh topic and fresh instances each). ``--write`` replaces the "Resume after SIGTERM"
section of bench/RESULTS.md.

    python -m bench.resume [--clients 1000] [--rate 20] [--server uvicorn] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from devtools.servers import SERVERS, server_command

from .harness import commit, conditions, node_client_ready, write_section
from .procs import stop_tree
from .stream import raise_fd_limit, server_extra

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "loopgate-bench"
GRACEFUL = 10  # seconds: A's graceful timeout (it closes every stream with 1001 well before)


def create_retained_topic(host: str, topic: str) -> None:
    from google.cloud import pubsub_v1
    from google.protobuf import duration_pb2

    publisher = pubsub_v1.PublisherClient()
    try:
        publisher.create_topic(
            request={
                "name": publisher.topic_path(PROJECT, topic),
                "message_retention_duration": duration_pb2.Duration(seconds=3600),
            }
        )
    finally:
        publisher.stop()


def start_instance(
    name: str, server: str, workers: int, topic: str, clients: int, scratch: Path
) -> tuple[subprocess.Popen[bytes], str]:
    """One loopgate instance; returns once ``/readyz`` answers 200."""
    from devtools.emulators import free_port

    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("LOOPGATE_")}
    env.update(
        {
            "LOOPGATE_PROJECT": PROJECT,
            "LOOPGATE_TOPICS": topic,
            "LOOPGATE_AUTH": "disabled",
            "LOOPGATE_STREAM_MAX_CONNECTIONS": str(max(10_000, 2 * clients)),
            "PROMETHEUS_MULTIPROC_DIR": str(scratch / f"metrics-{name}"),
        }
    )
    os.makedirs(env["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    extra = server_extra(server)
    if server == "hypercorn":
        extra += ["--graceful-timeout", str(GRACEFUL)]
    elif server == "uvicorn":
        extra += ["--timeout-graceful-shutdown", str(GRACEFUL)]
    with open(scratch / f"{name}.log", "ab") as out:
        process = subprocess.Popen(
            server_command(server, f"127.0.0.1:{port}", workers=workers, extra=extra),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"instance {name} exited at start; see {scratch / name}.log")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            pass
        time.sleep(0.2)
    stop_tree(process, timeout=20)
    raise RuntimeError(f"instance {name} was not ready within 60 s")


def one_run(args: argparse.Namespace, host: str, scratch: Path) -> dict[str, Any]:
    topic = f"resume-{uuid.uuid4().hex[:8]}"
    create_retained_topic(host, topic)
    a, url_a = start_instance("a", args.server, args.workers, topic, args.clients, scratch)
    b, url_b = start_instance("b", args.server, args.workers, topic, args.clients, scratch)
    result: dict[str, Any] = {}
    script = str(ROOT / "bench" / "resume_client.js")
    numbers = [args.clients, args.rate, args.warmup, args.after]
    client = subprocess.Popen(
        ["node", script, url_a, url_b, topic, *map(str, numbers)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdout is not None
    signalled = time.monotonic()
    deadline = time.monotonic() + 120 + args.warmup + args.after + 30
    try:
        for line in client.stdout:
            event = json.loads(line)
            if event["event"] == "signal":
                signalled = time.monotonic()
                os.kill(a.pid, signal.SIGTERM)  # the instance this run started, by its PID
            elif event["event"] == "result":
                result = event
                break
            if time.monotonic() > deadline:
                break
        a.wait(GRACEFUL + 30)
        result["a_exit_code"] = a.returncode
        result["a_exit_s"] = round(time.monotonic() - signalled, 2)
    finally:
        for process in (client, a, b):
            if process.poll() is None:
                stop_tree(process, timeout=20)  # type: ignore[arg-type]
    return result


def table(results: list[dict[str, Any]]) -> str:
    def median(key: str) -> float:
        values = [r[key] for r in results if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    rows = [
        "| run | caught up | all caught up (s) | p50 (s) | replayed msg/s | answered 200 | "
        "missing | duplicates (max per client) | A exit |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, r in enumerate(results, 1):
        rows.append(
            f"| {i} | {r.get('caught_up')}/{r.get('clients')} | {r.get('catch_up_max_s', 0):.2f} | "
            f"{r.get('catch_up_p50_s', 0):.2f} | {r.get('replayed_per_s') or 0:,.0f} | "
            f"{r.get('answered')} | {r.get('missing')} | {r.get('duplicates')} "
            f"({r.get('duplicates_max')}) | {r.get('a_exit_code')} in {r.get('a_exit_s')} s |"
        )
    rows.append(
        f"| median | | {median('catch_up_max_s'):.2f} | {median('catch_up_p50_s'):.2f} | "
        f"{median('replayed_per_s'):,.0f} | | {median('missing'):g} | | |"
    )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s published through B")
    parser.add_argument("--server", choices=SERVERS, default="uvicorn")
    parser.add_argument("--workers", type=int, default=1, help="workers per instance")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before SIGTERM")
    parser.add_argument("--after", type=float, default=6.0, help="publishing after the close")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    args = parser.parse_args()
    problem = node_client_ready()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    try:
        raise_fd_limit(2 * args.clients)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    from devtools.emulators import PubSubEmulator

    header = conditions()
    scratch = Path(tempfile.mkdtemp(prefix="loopgate-resume-"))
    emulator = PubSubEmulator().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    results = []
    try:
        for _ in range(args.runs):
            result = one_run(args, emulator.host, scratch)
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        emulator.stop()
    report = table(results)
    print(report)
    if args.write:
        write_section(
            "Resume after SIGTERM",
            [
                f"`python -m bench.resume {' '.join(sys.argv[1:])}` (commit {commit()})",
                "",
                f"Conditions: {header}. {args.clients:,} websocket clients on instance A "
                f"({args.server}, {args.workers} worker(s)); {args.rate:g} messages/s published "
                f"through instance B, one per request; SIGTERM to A after {args.warmup:g} s; "
                f"publishing goes on {args.after:g} s after the first close. Times are from A's "
                "first close.",
                "",
                report,
            ],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
