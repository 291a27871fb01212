"""HTTP publish benchmark: loopgate under each server against Flask, FastAPI and no-op ceilings.

Starts one Pub/Sub emulator and every server on loopback (2 workers each): loopgate under
Hypercorn, uvicorn and granian (with the command lines of ``devtools/servers.py``), Flask with a
client per request and with one global client, FastAPI with one client made in its lifespan, and
no-op Quart and FastAPI apps as ceilings. Then it measures with wrk
requests per second and p50/p99 latency at each connection count, in interleaved rounds so that
noise on a shared machine spreads over all setups alike; then messages per second through loopgate
with many messages per request. Prints a table and writes the "Publish" section of
``bench/RESULTS.md``. Everything it starts it stops, by PID::

    python -m bench.publish [--duration 10] [--rounds 3] [--connections 64,256]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from devtools.emulators import EmulatorError, PubSubEmulator, free_port
from devtools.run import create_topics
from devtools.servers import APP, server_command

from .load import Run, run_wrk
from .procs import Server
from .report import Conditions, render_table, write_results

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "loopgate-bench"
TOPIC = "bench"
URL_PATH = f"/v1/topics/{TOPIC}:publish"
PAYLOAD = base64.b64encode(b"loopgate-bench-" + b"x" * 49).decode()  # 64 bytes of data
SETUPS = (
    "flask-per-request",
    "flask-global",
    "fastapi-peer",
    "fastapi-noop",
    "quart-noop",
    "quart-noop-gc",
    "quart-noop-uvicorn",
    "loopgate",
    "loopgate-uvicorn",
    "loopgate-granian",
)
LABELS = {
    "flask-per-request": "Flask, client per request (gunicorn gthread)",
    "flask-global": "Flask, one global client (gunicorn gthread)",
    "fastapi-peer": "FastAPI, one client made in the lifespan (uvicorn)",
    "fastapi-noop": "FastAPI no-op (uvicorn), the ceiling for FastAPI on uvicorn",
    "quart-noop": "Quart no-op (Hypercorn), the ceiling",
    "quart-noop-gc": "Quart no-op with loopgate's garbage-collection settings",
    "quart-noop-uvicorn": "Quart no-op (uvicorn), the ceiling for Quart on uvicorn",
    "loopgate": "loopgate (Hypercorn)",
    "loopgate-uvicorn": "loopgate (uvicorn)",
    "loopgate-granian": "loopgate (granian)",
}
# The loopgate setups and the server each runs under (command lines from devtools/servers.py).
LOOPGATE_SERVERS = {
    "loopgate": "hypercorn",
    "loopgate-uvicorn": "uvicorn",
    "loopgate-granian": "granian",
}
# What a FastAPI user runs: uvicorn with its fast parser and loop, no access log.
FASTAPI_FLAGS = ("--loop", "uvloop", "--http", "httptools", "--no-access-log")


def body(messages: int) -> bytes:
    items = ",".join(f'{{"data":"{PAYLOAD}"}}' for _ in range(messages))
    return f'{{"messages":[{items}]}}'.encode()


def server_env(metrics_dir: Path) -> dict[str, str]:
    """The environment every publish setup runs with (the emulator's host already set)."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LOOPGATE_")},
        "PYTHONPATH": str(ROOT),
        "BENCH_PROJECT": PROJECT,
        "LOOPGATE_PROJECT": PROJECT,
        "LOOPGATE_AUTH": "disabled",  # the peers have no auth either
        "LOOPGATE_TOPICS": TOPIC,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }


def setup_command(key: str, port: int, workers: int, threads: int, scratch: Path) -> list[str]:
    """The command line that serves setup ``key`` on loopback ``port``."""
    bind = f"127.0.0.1:{port}"
    if key in ("loopgate-uvicorn", "loopgate-granian"):
        # The documented flags as they are (access log included, as in production).
        return server_command(LOOPGATE_SERVERS[key], bind, workers=workers, app=APP)
    if key == "quart-noop-uvicorn":
        # What a Quart user runs on uvicorn: the FastAPI setups' flags, no access log.
        return [
            sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            f"--workers={workers}", *FASTAPI_FLAGS, "bench.apps.quart_noop:app",
        ]  # fmt: skip
    if key.startswith("fastapi"):
        return [
            sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
            f"--workers={workers}", *FASTAPI_FLAGS, f"bench.apps.{key.replace('-', '_')}:app",
        ]  # fmt: skip
    if key.startswith("flask"):
        module = key.replace("-", "_")
        return [
            sys.executable,
            "-m",
            "gunicorn",
            f"--workers={workers}",
            "--worker-class=gthread",
            f"--threads={threads}",
            f"--bind={bind}",
            "--backlog=2048",
            "--keep-alive=75",
            "--access-logfile=/dev/null",
            f"--error-logfile={scratch / (key + '.err')}",
            f"bench.apps.{module}:app",
        ]
    app = {
        "loopgate": APP,
        "quart-noop": "bench.apps.quart_noop:app",
        "quart-noop-gc": "bench.apps.quart_noop_gc:app",
    }[key]
    return [
        sys.executable,
        "-m",
        "hypercorn",
        "--config",
        str(ROOT / "hypercorn.toml"),
        f"--workers={workers}",
        f"--bind={bind}",
        "--access-logfile=/dev/null",
        f"--error-logfile={scratch / (key + '.err')}",
        app,
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.publish", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measurement")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of warm-up per setup")
    parser.add_argument("--connections", default="64,256", help="comma-separated counts")
    parser.add_argument(
        "--batch-size", default="100,1000", help="messages per batched request (comma-separated)"
    )
    parser.add_argument("--batch-connections", default="64", help="for the batched runs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes per server")
    parser.add_argument("--threads", type=int, default=16, help="threads per gunicorn worker")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated subset")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.setups = [key for key in args.setups.split(",") if key]
    unknown = set(args.setups) - set(SETUPS)
    if unknown or not args.setups:
        parser.error(f"unknown setups {sorted(unknown)}; known: {', '.join(SETUPS)}")
    args.connections = [int(c) for c in args.connections.split(",") if c]
    args.batch_connections = [int(c) for c in args.batch_connections.split(",") if c]
    args.batch_size = [int(n) for n in args.batch_size.split(",") if int(n or 0) > 1]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 1
    conditions = Conditions.now(args)
    scratch = ROOT / "bench" / "out" / time.strftime("%Y%m%d-%H%M%S")
    scratch.mkdir(parents=True, exist_ok=True)
    single = scratch / "single.json"
    single.write_bytes(body(1))
    batched = {size: scratch / f"batched-{size}.json" for size in args.batch_size}
    for size, path in batched.items():
        path.write_bytes(body(size))
    try:
        emulator = PubSubEmulator()
    except EmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    servers: dict[str, Server] = {}
    runs: list[Run] = []
    metrics_dir = Path(tempfile.mkdtemp(prefix="loopgate-bench-metrics-"))
    try:
        print(f"starting the Pub/Sub emulator on {emulator.host} ...", flush=True)
        emulator.start()
        assert emulator.process is not None
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        create_topics(PROJECT, [TOPIC])
        env = server_env(metrics_dir)
        for key in args.setups:
            port = free_port()
            servers[key] = Server(
                key,
                LABELS[key],
                setup_command(key, port, args.workers, args.threads, scratch),
                env,
                ROOT,
                scratch / f"{key}.out",
                port,
            )
            servers[key].start()
        for server in servers.values():
            server.wait_ready(URL_PATH, body(1), 1, timeout=90)
            print(f"  {server.key} ready on {server.base_url} (pids {server.pids})", flush=True)

        def measure(key: str, connections: int, messages: int, duration: float) -> Run:
            assert emulator.process is not None
            run = run_wrk(
                servers[key],
                url_path=URL_PATH,
                body_file=batched[messages] if messages > 1 else single,
                messages=messages,
                connections=connections,
                duration=duration,
                threads=args.wrk_threads,
                emulator_pid=emulator.process.pid,
            )
            gone = servers[key].replaced_workers()
            if gone:
                # Its CPU is counted only up to the worker's end: say so beside the table.
                note = f"{key}: worker(s) {gone} ended during a run at {connections} connections"
                conditions.notes.append(note)
                print(f"  warning: {note}", flush=True)
            time.sleep(1.0)  # let the server settle between runs
            return run

        print("warming up ...", flush=True)
        for key in servers:
            measure(key, max(args.connections), 1, args.warmup)
        if "loopgate" in servers:
            for size in args.batch_size:
                measure("loopgate", max(args.batch_connections), size, args.warmup)
        keys = list(servers)
        for round_ in range(args.rounds):
            order = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]
            for connections in args.connections:
                for key in order:
                    run = measure(key, connections, 1, args.duration)
                    runs.append(run)
                    print(
                        f"  round {round_ + 1}: {key:<18} c={connections:<4} "
                        f"{run.rps:8.0f} req/s  p50 {run.p50_ms:7.1f} ms  "
                        f"p99 {run.p99_ms:7.1f} ms  errors {run.errors}",
                        flush=True,
                    )
            if "loopgate" in servers:
                for size in args.batch_size:
                    for connections in args.batch_connections:
                        run = measure("loopgate", connections, size, args.duration)
                        runs.append(run)
                        print(
                            f"  round {round_ + 1}: loopgate x{size:<4}    "
                            f"c={connections:<4} {run.mps:8.0f} msg/s  p99 {run.p99_ms:7.1f} ms  "
                            f"errors {run.errors}",
                            flush=True,
                        )
    except (EmulatorError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for server in servers.values():
            server.stop()
        emulator.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    conditions.finish()
    (scratch / "runs.json").write_text(json.dumps([asdict(run) for run in runs], indent=1))
    print()
    print(render_table(runs, conditions))
    if not args.no_write:
        write_results(args.results, runs, conditions)
        print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
