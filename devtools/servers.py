"""The command lines that serve loopgate under each supported server, and stopping a child process
by its PID.

Hypercorn reads ``hypercorn.toml``; uvicorn and granian take flags (their settings are listed in
the README), and each reads a JSON logging configuration of the repository so that every server
writes the same JSON lines.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "service:create_app()"
FACTORY = "service:create_app"  # what uvicorn's and granian's --factory call
SERVERS = ("hypercorn", "uvicorn", "granian")
DEFAULT_SERVER = "hypercorn"


def hypercorn_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with ``hypercorn.toml`` on ``bind``."""
    command = [
        sys.executable, "-m", "hypercorn", "--config", str(ROOT / "hypercorn.toml"),
        "--bind", bind,
    ]  # fmt: skip
    if workers is not None:
        command += ["--workers", str(workers)]
    return [*command, *extra, app]


def uvicorn_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with uvicorn on ``bind`` (flags: see the README)."""
    return _flags_command("uvicorn", UVICORN_FLAGS, bind, workers, app, extra)


def granian_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with granian on ``bind`` (flags: see the README)."""
    return _flags_command("granian", GRANIAN_FLAGS, bind, workers, app, extra)


def _flags_command(
    server: str,
    flags: Sequence[str],
    bind: str,
    workers: int | None,
    app: str,
    extra: Sequence[str],
) -> list[str]:
    """A server taking flags and a JSON logging configuration (``<server>-log.json``)."""
    host, port = bind.rsplit(":", 1)
    command = [
        sys.executable, "-m", server, "--host", host, "--port", port,
        "--workers", str(workers or 2), *flags,
        "--log-config", str(ROOT / f"{server}-log.json"),
    ]  # fmt: skip
    return [*command, *extra, *_factory(app)]


# The production flags of each server, as the README lists them.
UVICORN_FLAGS: tuple[str, ...] = (
    "--loop", "uvloop", "--lifespan", "on",
    # uvicorn's httptools protocol with a bounded and timed request head (431 over the size
    # below), and websocket compression as LOOPGATE_STREAM_COMPRESSION says: service/server/uvicorn.
    "--http", "service.server.uvicorn.adapt:HttpToolsProtocol",
    "--h11-max-incomplete-event-size", "16384",
    "--ws", "service.server.uvicorn.adapt:WebSocketsSansIOProtocol",
    "--ws-max-size", "262144", "--ws-per-message-deflate", "true",
    "--timeout-graceful-shutdown", "20", "--timeout-keep-alive", "75", "--backlog", "2048",
    "--no-server-header",
    # With --workers, uvicorn's supervisor kills a worker that does not answer its health check
    # within this many seconds (5 by default: a worker still starting on a busy host was killed).
    "--timeout-worker-healthcheck", "30",
    # loopgate writes the access log (service/logs.py AccessLog): uvicorn's has no size nor duration.
    "--no-access-log",
)  # fmt: skip
GRANIAN_FLAGS: tuple[str, ...] = (
    "--interface", "asgi", "--loop", "uvloop", "--backlog", "2048",
    # The request head: 16 KiB at most over HTTP/1.1 (431 above), and over HTTP/2 (h2c).
    "--http1-buffer-size", "16384", "--http2-max-headers-size", "16384",
    "--http2-max-concurrent-streams", "100",
    # Granian's one idle timer: a head must be complete this long (ms) after the previous
    # response (or after its first byte); 60 s is granian's largest. See service/server/granian.
    "--http1-header-read-timeout", "60000",
    # Connections served at once per worker, streams included: above the gate's
    # LOOPGATE_STREAM_MAX_CONNECTIONS (10 000), so that the gate refuses the excess with a clear
    # answer instead of granian leaving it unaccepted.
    "--backpressure", "12288",
    "--workers-kill-timeout", "20",
)  # fmt: skip


def keep_alive_args(server: str, seconds: int) -> list[str]:
    """The flags that set ``server``'s keep-alive timeout (granian's is at most 60 s)."""
    if server == "hypercorn":
        return ["--keep-alive", str(seconds)]
    if server == "uvicorn":
        return ["--timeout-keep-alive", str(seconds)]
    return ["--http1-header-read-timeout", str(min(seconds, 60) * 1000)]


def _factory(app: str) -> list[str]:
    """``module:create_app()`` (Hypercorn's form) as uvicorn's and granian's ``--factory`` form."""
    if app.endswith("()"):
        return ["--factory", app[:-2]]
    return [app]


def server_command(
    server: str,
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` on ``bind`` with ``server`` (one of :data:`SERVERS`)."""
    commands = {
        "hypercorn": hypercorn_command,
        "uvicorn": uvicorn_command,
        "granian": granian_command,
    }
    if server not in commands:
        raise ValueError(f"unknown server {server!r}: choose one of {', '.join(SERVERS)}")
    return commands[server](bind, workers=workers, app=app, extra=extra)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """SIGTERM a child this program started, wait up to ``timeout``, then SIGKILL it.

    Returns its exit code.
    """
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
    return process.returncode
