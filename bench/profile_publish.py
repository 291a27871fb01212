"""Where a publish server's CPU goes under load: py-spy samples of its workers during a wrk run.

Starts the Pub/Sub emulator and one setup of the publish benchmark (loopgate by default), loads it
with wrk, samples every worker with ``py-spy record`` meanwhile, and prints the CPU per request by
package (the innermost frame of a known package gets the sample) and the functions with the most
own time. The collapsed stacks stay in ``bench/out/`` for a flame graph::

    python -m bench.profile_publish [--setup loopgate] [--connections 256] [--duration 20]

``--in-process`` serves loopgate with Hypercorn in this very process instead (one worker, the
settings of hypercorn.toml, the access log written to /dev/null through loopgate's JSON formatter)
and loads it with wrk, in short rounds that alternate variants (the access log with Hypercorn's
atoms, with loopgate's, none; quart-schema converting every response) so that noise from the rest
of the machine falls on each alike. It prints this process's CPU per request
(``time.process_time``: every thread, gRPC's included) for each variant, then, with
``--profile``, a cProfile of one more round (own time by layer and function). With
``--stub-publisher`` the publisher answers at once without calling Pub/Sub: what is left is
loopgate's own path, without gRPC and without the batch sizes that vary with the emulator::

    python -m bench.profile_publish --in-process [--rounds 3] [--duration 2] [--profile]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from devtools.emulators import PubSubEmulator, free_port
from devtools.run import create_topics

from .load import run_wrk
from .procs import Server, cpu_seconds
from .publish import (
    LABELS,
    PROJECT,
    ROOT,
    SETUPS,
    TOPIC,
    URL_PATH,
    body,
    server_env,
    setup_command,
)

# (layer, pattern on a frame's file); the first layer found from the innermost frame outwards wins.
LAYERS = [
    ("prometheus-client (metrics)", r"prometheus_client/"),
    ("pydantic / quart-schema (validation)", r"pydantic|quart_schema/"),
    ("gRPC / google-api-core / pubsub_v1 / proto-plus", r"grpc|google/api_core|pubsub_v1|proto/"),
    ("json", r"/json/"),
    ("h11 (HTTP/1.1 parsing)", r"/h11/"),
    ("hypercorn", r"hypercorn/"),
    ("uvicorn / httptools", r"uvicorn/|httptools/"),
    ("granian", r"granian/"),
    ("fastapi / starlette", r"fastapi/|starlette/"),
    ("quart / werkzeug", r"quart/|werkzeug/|flask/"),
    ("loopgate (service/)", r"service/"),
    ("asyncio / uvloop", r"asyncio/|uvloop/"),
]
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile_publish", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument(
        "--setup", choices=[s for s in SETUPS if s != "flask-per-request"], default="loopgate"
    )
    parser.add_argument("--connections", type=int, default=256)
    parser.add_argument("--messages", type=int, default=1, help="messages per request")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16, help="threads per gunicorn worker")
    parser.add_argument("--top", type=int, default=25, help="functions to list")
    parser.add_argument(
        "--in-process", action="store_true", help="serve in this process, CPU per request"
    )
    parser.add_argument("--rounds", type=int, default=3, help="--in-process: rounds per variant")
    parser.add_argument("--profile", action="store_true", help="--in-process: cProfile a round")
    parser.add_argument(
        "--micro", action="store_true", help="--in-process: tight loops of the variants first"
    )
    parser.add_argument(
        "--stub-publisher", action="store_true", help="--in-process: no Pub/Sub calls"
    )
    parser.add_argument(
        "--variants",
        default="upstream-both,hypercorn-atoms,convert-every-response,loopgate-atoms,no-access-log",
        help="--in-process: variants to alternate (see bench/profile_inprocess.py)",
    )
    return parser.parse_args(argv)


def layer_of(stack: list[str]) -> str:
    for frame in reversed(stack):
        match = FRAME.match(frame)
        path = match["file"] if match else frame
        for name, pattern in LAYERS:
            if re.search(pattern, path):
                return name
    return "other (stdlib, C, unknown)"


def short(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarize(files: list[Path], cpu: float, requests: int, top: int) -> str:
    layers: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for file in files:
        for line in file.read_text().splitlines():
            stack_text, _, count_text = line.rpartition(" ")
            if not stack_text or not count_text.isdigit():
                continue
            count = int(count_text)
            stack = [frame for frame in stack_text.split(";") if frame]
            # py-spy puts the thread first ("process 1 ..."/"thread ..."); frames follow.
            stack = [frame for frame in stack if FRAME.match(frame)]
            total += count
            layers[layer_of(stack)] += count
            own[short(stack[-1]) if stack else "?"] += count
    if not total:
        return "no samples"
    per_request = 1e6 * cpu / requests if requests else 0.0
    lines = [
        f"{total} samples; workers used {cpu:.1f} CPU s for {requests} requests: "
        f"{per_request:.0f} us CPU per request",
        "",
        "| layer (innermost frame) | share | us/request |",
        "|---|---:|---:|",
    ]
    for name, count in layers.most_common():
        lines.append(f"| {name} | {count / total:.1%} | {per_request * count / total:.0f} |")
    lines += ["", "| function (own time) | share |", "|---|---:|"]
    for name, count in own.most_common(top):
        lines.append(f"| {name} | {count / total:.1%} |")
    return "\n".join(lines)


def batch_sizes(base_url: str) -> str:
    """The mean messages per Pub/Sub publish call, from loopgate's own metrics."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for name in (
        "loopgate_publish_batch_messages_sum",
        "loopgate_publish_batch_messages_count",
        "loopgate_publish_latency_seconds_sum",
        "loopgate_publish_latency_seconds_count",
    ):
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        values[name] = float(found[1]) if found else 0.0
    count = values["loopgate_publish_batch_messages_count"]
    mean = values["loopgate_publish_batch_messages_sum"] / count if count else 0.0
    waited = values["loopgate_publish_latency_seconds_count"]
    latency = values["loopgate_publish_latency_seconds_sum"] / waited if waited else 0.0
    return (
        f"Pub/Sub publish calls: {count:,.0f}, {mean:.1f} messages per call on average; "
        f"requests waited {1000 * latency:.1f} ms on average for Pub/Sub's answer"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.in_process:
        from .profile_inprocess import run_in_process

        return run_in_process(args)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists() or shutil.which("wrk") is None:
        print(
            "error: needs py-spy (pip install py-spy) and wrk (apt-get install wrk)",
            file=sys.stderr,
        )
        return 1
    scratch = ROOT / "bench" / "out" / ("profile-" + time.strftime("%Y%m%d-%H%M%S"))
    scratch.mkdir(parents=True, exist_ok=True)
    body_file = scratch / "body.json"
    body_file.write_bytes(body(args.messages))
    metrics_dir = Path(tempfile.mkdtemp(prefix="loopgate-bench-metrics-"))
    emulator = PubSubEmulator()
    server: Server | None = None
    try:
        emulator.start()
        assert emulator.process is not None
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        create_topics(PROJECT, [TOPIC])
        env = server_env(metrics_dir)
        port = free_port()
        command = setup_command(args.setup, port, args.workers, args.threads, scratch)
        server = Server(
            args.setup, LABELS[args.setup], command, env, ROOT, scratch / "server.out", port
        )
        server.start()
        server.wait_ready(URL_PATH, body(1), 1, timeout=90)

        def load(duration: float) -> tuple[int, float]:
            assert emulator.process is not None and server is not None
            run = run_wrk(
                server,
                url_path=URL_PATH,
                body_file=body_file,
                messages=args.messages,
                connections=args.connections,
                duration=duration,
                threads=2,
                emulator_pid=emulator.process.pid,
            )
            return run.requests, run.rps

        load(3)
        # The workers are the children that worked during the warm-up.
        assert server.process is not None
        children = [pid for pid in server.pids if pid != server.process.pid]
        workers = sorted(children, key=lambda pid: cpu_seconds([pid]))[-args.workers :]
        outputs = [scratch / f"pyspy-{pid}.txt" for pid in workers]
        spies = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.duration)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, out in zip(workers, outputs, strict=True)
        ]
        before = [cpu_seconds([pid]) for pid in workers]
        requests, rps = load(args.duration + 1)
        split = [cpu_seconds([pid]) - b for pid, b in zip(workers, before, strict=True)]
        cpu = sum(split)
        for process in spies:
            process.wait(timeout=60)
        print(
            f"{args.setup} at {args.connections} connections, {args.messages} message(s) "
            f"per request: {rps:,.0f} req/s while sampled (py-spy adds some load)\n"
        )
        print("CPU seconds per worker: " + ", ".join(f"{c:.1f}" for c in split))
        if args.setup == "loopgate":
            print(batch_sizes(server.base_url))
        print(summarize([out for out in outputs if out.exists()], cpu, requests, args.top))
        print(f"\ncollapsed stacks: {', '.join(str(o.relative_to(ROOT)) for o in outputs)}")
    finally:
        if server is not None:
            server.stop()
        emulator.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
