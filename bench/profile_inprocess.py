"""``python -m bench.profile_publish --in-process``: loopgate served by Hypercorn in this process.

The CPU this process uses per request is what one worker spends on a publish (``time.process_time``
counts every thread of the process: the event loop's and gRPC's). wrk runs as a child process, so
its CPU is not counted. Rounds alternate these variants on the one running server:

* ``hypercorn-atoms``: Hypercorn's own ``Logger`` (its atoms copy every header and every
  environment variable for each line);
* ``loopgate-atoms``: the logger loopgate installs (``service/server/hypercorn/access_log.py``), if
  this tree has it;
* ``no-access-log``: no access log at all, for its cost;
* ``convert-every-response``: loopgate's access log, and quart-schema's conversion of every
  response as quart-schema installs it (loopgate skips it for responses that need none);
* ``upstream-both``: Hypercorn's atoms and quart-schema's conversion of every response, as before;
* ``request-tasks``: loopgate's access log, and every request served by Quart's two tasks (a
  small body is otherwise read first, and its handler run in the connection's task).

Absolute numbers depend on what else the machine runs; compare the variants of one run.
``GRPC_ENABLE_FORK_SUPPORT=false`` in the environment spares the line gRPC logs each time wrk is
started.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import cProfile
import importlib
import json
import os
import pstats
import re
import shutil
import statistics
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devtools.emulators import PubSubEmulator, free_port
from devtools.run import create_topics

from .load import LUA, MARK
from .publish import PROJECT, ROOT, TOPIC, URL_PATH, body

LAYERS = [
    ("prometheus-client (metrics)", r"prometheus_client/"),
    ("pydantic / quart-schema (validation)", r"pydantic|quart_schema/"),
    ("gRPC / google-api-core / pubsub_v1 / proto-plus", r"grpc|google/api_core|pubsub_v1|proto/"),
    ("json", r"/json/"),
    ("logging", r"/logging/"),
    ("h11 (HTTP/1.1 parsing)", r"/h11/"),
    ("hypercorn", r"hypercorn/"),
    ("quart / werkzeug", r"quart/|werkzeug/|flask/"),
    ("loopgate (service/)", r"service/"),
    ("asyncio / uvloop", r"asyncio/|uvloop/"),
]


def _layer(path: str) -> str:
    for name, pattern in LAYERS:
        if re.search(pattern, path):
            return name
    return "other (stdlib, C, unknown)"


def _variants(config: Any, app: Any) -> dict[str, Callable[[], None]]:
    """Each variant, as what puts it in place on the running server's ``config`` and ``app``."""
    import types

    from hypercorn.logging import Logger
    from quart import Quart
    from quart_schema.extension import wrap_make_response

    loggers: dict[str, Any] = {"hypercorn-atoms": Logger(config)}
    try:
        access_log = importlib.import_module("service.server.hypercorn.access_log")
    except ImportError:
        lean = loggers["hypercorn-atoms"]
    else:
        lean = loggers["loopgate-atoms"] = access_log.AccessLogger(config)
    off = Logger(config)
    off.access_logger = None
    loggers["no-access-log"] = off
    as_built = app.make_response
    # quart-schema's conversion of every response, as its init_app installs it.
    converting = wrap_make_response(types.MethodType(Quart.make_response, app))

    connection = app.asgi_http_class
    with_tasks = connection
    if hasattr(connection, "serve_with_tasks"):

        class WithTasks(connection):  # type: ignore[misc,valid-type]
            async def __call__(self, receive: Any, send: Any) -> None:
                request = self._create_request_from_scope(send)
                await self.serve_with_tasks(request, receive, send)

        with_tasks = WithTasks

    def use(logger: Any, make_response: Any, http_class: Any = connection) -> Callable[[], None]:
        def apply() -> None:
            config._log = logger  # the server reads config.log for every access line
            app.make_response = make_response
            app.asgi_http_class = http_class

        return apply

    variants = {name: use(logger, as_built) for name, logger in loggers.items()}
    variants["convert-every-response"] = use(lean, converting)
    variants["upstream-both"] = use(loggers["hypercorn-atoms"], converting)
    variants["request-tasks"] = use(lean, as_built, with_tasks)
    return variants


async def _micro(config: Any, app: Any, variants: dict[str, Callable[[], None]]) -> None:
    """Tight loops over the pieces the variants change: one access line (atoms, the JSON
    formatter, the write to /dev/null), one ``make_response`` of a publish answer, and one
    publish through the app's ASGI callable (no server, no socket; Pub/Sub's answer stubbed)."""
    from quart import Response

    from service.clients.pubsub.publisher import Publisher

    request = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": URL_PATH,
        "raw_path": URL_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"content-length", b"100"),
            (b"content-type", b"application/json"),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    response = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", b"27"),
            (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
            (b"date", b"Wed, 02 Dec 2026 01:00:00 GMT"),
            (b"server", b"hypercorn-h11"),
        ],
    }
    count = 5000
    payload = body(1)
    publish_scope = {
        **request,
        "asgi": {"version": "3.0"},
        "headers": [
            (b"host", b"127.0.0.1:8080"),
            (b"content-length", b"%d" % len(payload)),
            (b"content-type", b"application/json"),
        ],
    }

    async def publish_once() -> None:
        sent: list[Any] = []
        messages = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive() -> Any:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays

        async def send(message: Any) -> None:
            sent.append(message)

        await app(dict(publish_scope), receive, send)
        assert sent[0]["status"] == 200, sent

    async def stubbed(self: Any, topic: str, messages: Any, trace: Any = None) -> list[str]:
        return [str(index) for index in range(len(messages))]

    async def best(step: Callable[[], Any], calls: int = count) -> float:
        times = []
        for _ in range(5):
            start = time.process_time()
            for _ in range(calls):
                await step()
            times.append(time.process_time() - start)
        return 1e6 * min(times) / calls

    print(
        f"\ntight loops, best of 5 x {count} (us per call; the app: x {count // 5}), "
        f"{len(os.environ)} environment variables:\n\n"
        "| variant | one access line | make_response of a publish answer | the app, one publish |"
        "\n|---|---:|---:|---:|"
    )
    real_publish = Publisher.publish
    for name, apply in variants.items():
        apply()
        logger = config.log
        line = await best(lambda logger=logger: logger.access(request, response, 0.001))
        async with app.app_context():
            made = await best(lambda: app.make_response(Response('{"messageIds":["1"]}', 200)))
        Publisher.publish = stubbed  # type: ignore[method-assign]
        try:
            whole = await best(publish_once, count // 5)
        finally:
            Publisher.publish = real_publish  # type: ignore[method-assign]
        print(f"| {name} | {line:.1f} | {made:.1f} | {whole:.1f} |")
    own_line = await _own_access_line(request, best)
    print(
        f"\nloopgate's own access line (service.logs.AccessLog, under uvicorn and granian), "
        f"written to {os.devnull}: {own_line:.1f} us"
    )


def _devnull_handler() -> Any:
    import logging

    return logging.StreamHandler(open(os.devnull, "w"))  # the caller closes it


async def _own_access_line(scope: dict[str, Any], best: Callable[..., Any]) -> float:
    """One line of the access log loopgate writes itself, through the handler and formatter
    ``configure_logging`` installs, to /dev/null."""
    import logging

    from service import logs

    handler = _devnull_handler()
    handler.setFormatter(logs.JsonFormatter())
    access = logging.getLogger("loopgate.access")
    saved = access.handlers[:], access.propagate, access.level
    access.handlers[:] = [handler]
    access.propagate, access.level = False, logging.INFO
    start = time.perf_counter_ns()
    request_id = "0123456789abcdef0123456789abcdef"

    async def line() -> None:
        logs._log_access(scope, 200, 27, start, request_id)

    try:
        return float(await best(line))
    finally:
        access.handlers[:], access.propagate, access.level = saved
        handler.stream.close()


async def _wrk(port: int, body_file: Path, connections: int, duration: float) -> int:
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "--threads=1",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        "--timeout=10s",
        f"--script={LUA}",
        f"http://127.0.0.1:{port}{URL_PATH}",
        env={**os.environ, "BENCH_BODY_FILE": str(body_file)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), duration + 60)
    lines = [line for line in out.decode().splitlines() if line.startswith(MARK)]
    if process.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({process.returncode}): {err.decode()[-500:]}")
    result = json.loads(lines[-1][len(MARK) :])
    errors = sum(result[key] for key in ("connect", "read", "write", "status", "timeout"))
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors: {result}")
    return int(result["requests"])


def _profile_report(profile: cProfile.Profile, requests: int, top: int) -> str:
    stats = pstats.Stats(profile)
    entries: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values()) or 1e-9
    layers: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for (file, line, func), (_, _, tottime, _, _) in entries.items():
        layers[_layer(file)] += tottime
        for marker in ("site-packages/", "python3.11/", str(ROOT) + "/"):
            if marker in file:
                file = file.split(marker, 1)[1]
        own[f"{func} ({file}:{line})"] += tottime
    per_request = 1e6 * total / requests
    lines = [
        f"cProfile, event loop thread, {requests} requests: {per_request:.0f} us own time per "
        "request under the profiler (its overhead inflates this; read the shares)",
        "",
        "| layer (own time) | share | us/request |",
        "|---|---:|---:|",
    ]
    for name, seconds in layers.most_common():
        lines.append(f"| {name} | {seconds / total:.1%} | {1e6 * seconds / requests:.0f} |")
    lines += ["", "| function (own time) | share |", "|---|---:|"]
    for name, seconds in own.most_common(top):
        lines.append(f"| {name} | {seconds / total:.1%} |")
    return "\n".join(lines)


async def _serve_and_measure(args: argparse.Namespace, scratch: Path) -> None:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from service import create_app

    config = Config.from_toml(ROOT / "hypercorn.toml")
    port = free_port()
    config.bind = [f"127.0.0.1:{port}"]
    logging_config = copy.deepcopy(config.logconfig_dict)
    logging_config["handlers"]["access"] = {
        "class": "logging.FileHandler",
        "filename": os.devnull,
        "formatter": "json",
    }
    config.logconfig_dict = logging_config
    if args.stub_publisher:
        from service.clients.pubsub.publisher import Publisher

        async def publish(
            self: Publisher, topic: str, messages: Any, trace: Any = None
        ) -> list[str]:
            return [str(index) for index in range(len(messages))]

        Publisher.publish = publish  # type: ignore[method-assign]
    app = create_app()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    body_file = scratch / "body.json"
    body_file.write_bytes(body(args.messages))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                await asyncio.to_thread(
                    urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", timeout=5
                )
                break
            except OSError:
                if time.monotonic() > deadline or server.done():
                    raise
                await asyncio.sleep(0.2)
        made = type(config.log)  # the logger the server made, before the variants replace it
        print(f"the server's own access logger: {made.__module__}.{made.__qualname__}")
        variants = _variants(config, app)
        wanted = [name for name in args.variants.split(",") if name in variants]
        if args.micro:
            await _micro(config, app, {name: variants[name] for name in wanted})
        await _wrk(port, body_file, args.connections, 1)  # warm-up
        cpu: dict[str, list[float]] = {name: [] for name in wanted}
        for _ in range(args.rounds):
            for name in wanted:
                variants[name]()
                before = time.process_time()
                requests = await _wrk(port, body_file, args.connections, args.duration)
                cpu[name].append(1e6 * (time.process_time() - before) / requests)
        print(
            f"\nCPU of this process per request (us), {args.connections} connections, "
            f"{args.messages} message(s), {args.rounds} rounds of {args.duration:.0f} s each"
            f"{', publisher stubbed' if args.stub_publisher else ''}:\n"
        )
        print("| variant | median | best | rounds |\n|---|---:|---:|---|")
        for name in wanted:
            rounds = ", ".join(f"{value:.0f}" for value in cpu[name])
            print(
                f"| {name} | {statistics.median(cpu[name]):.0f} | {min(cpu[name]):.0f} | {rounds} |"
            )
        if args.profile:
            variants[wanted[0]]()
            profile = cProfile.Profile()
            profile.enable()
            requests = await _wrk(port, body_file, args.connections, args.duration)
            profile.disable()
            print(f"\nprofiled with access log {wanted[0]}")
            print(_profile_report(profile, requests, args.top))
            profile.dump_stats(scratch / "publish.prof")
            print(f"\npstats file: {(scratch / 'publish.prof').relative_to(ROOT)}")
    finally:
        stop.set()
        await asyncio.wait_for(server, 60)


def run_in_process(args: argparse.Namespace) -> int:
    """Start the emulator, serve loopgate here, measure; everything started is stopped."""
    if shutil.which("wrk") is None:
        print("error: needs wrk (apt-get install wrk)")
        return 1
    scratch = ROOT / "bench" / "out" / ("inprocess-" + time.strftime("%Y%m%d-%H%M%S"))
    scratch.mkdir(parents=True, exist_ok=True)
    metrics_dir = tempfile.mkdtemp(prefix="loopgate-bench-metrics-")
    emulator = PubSubEmulator()
    saved = dict(os.environ)
    try:
        emulator.start()
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        create_topics(PROJECT, [TOPIC])
        for key in [key for key in os.environ if key.startswith("LOOPGATE_")]:
            del os.environ[key]
        os.environ.update(
            {
                "LOOPGATE_PROJECT": PROJECT,
                "LOOPGATE_AUTH": "disabled",
                "LOOPGATE_TOPICS": TOPIC,
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            }
        )
        import uvloop

        uvloop.run(_serve_and_measure(args, scratch))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        emulator.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0
