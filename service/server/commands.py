"""The production command line of each supported server: ``loopgate serve`` runs it, and the
tests, ``make run`` and the benchmarks use the same one (``devtools/servers.py``).

Hypercorn reads ``hypercorn.toml``; uvicorn and granian take the flags below (the README lists
them), and each reads a JSON logging configuration (``uvicorn-log.json``, ``granian-log.json``)
so that every server writes the same JSON lines. Those three files live at the top of the
repository; :func:`config_dir` finds them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

APP = "service:create_app()"
FACTORY = "service:create_app"  # what uvicorn's and granian's --factory call
SERVERS = ("hypercorn", "uvicorn", "granian")
HYPERCORN_CONFIG = "hypercorn.toml"
DEFAULT_PORT = 8080
DEFAULT_WORKERS = 2  # uvicorn's and granian's; Hypercorn's is in hypercorn.toml

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
FLAGS = {"uvicorn": UVICORN_FLAGS, "granian": GRANIAN_FLAGS}
# The flag of each flag-taking server that is its graceful timeout (seconds).
GRACEFUL_TIMEOUT_FLAGS = {
    "uvicorn": "--timeout-graceful-shutdown",
    "granian": "--workers-kill-timeout",
}


def config_dir() -> Path:
    """Where ``hypercorn.toml`` and the logging configurations are: the repository that holds
    this package when it runs from a checkout (or an editable install), else the current
    directory (the container image copies them into its working directory)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / HYPERCORN_CONFIG).is_file():
        return checkout
    return Path.cwd()


def config_files(server: str, directory: Path) -> list[Path]:
    """The files of ``directory`` that ``server``'s command line reads."""
    if server == "hypercorn":
        return [directory / HYPERCORN_CONFIG]
    return [directory / f"{server}-log.json"]


def installed(server: str) -> bool:
    """Whether ``server`` can be imported by this Python."""
    return importlib.util.find_spec(server) is not None


def default_server() -> str:
    """The fastest server installed: uvicorn when it is (see the README's Performance), else
    Hypercorn, which comes with loopgate."""
    return "uvicorn" if installed("uvicorn") else "hypercorn"


def default_bind() -> str:
    """All interfaces, on ``$PORT`` (what Cloud Run sets) or :data:`DEFAULT_PORT`."""
    return f"0.0.0.0:{os.environ.get('PORT') or DEFAULT_PORT}"


def server_command(
    server: str,
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
    directory: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The command line that serves ``app`` on ``bind`` (``HOST:PORT``) with ``server``, reading
    its configuration files from ``directory`` (default :func:`config_dir`).

    Raises:
        ValueError: ``server`` is not one of :data:`SERVERS`.
    """
    if server not in SERVERS:
        raise ValueError(f"unknown server {server!r}: choose one of {', '.join(SERVERS)}")
    directory = config_dir() if directory is None else directory
    if server == "hypercorn":
        command = [
            python, "-m", "hypercorn", "--config", str(directory / HYPERCORN_CONFIG),
            "--bind", bind,
        ]  # fmt: skip
        if workers is not None:
            command += ["--workers", str(workers)]
        return [*command, *extra, app]
    host, port = bind.rsplit(":", 1)
    command = [
        python, "-m", server, "--host", host, "--port", port,
        "--workers", str(workers or DEFAULT_WORKERS), *FLAGS[server],
        "--log-config", str(directory / f"{server}-log.json"),
    ]  # fmt: skip
    return [*command, *extra, *factory_args(app)]


def factory_args(app: str) -> list[str]:
    """``module:create_app()`` (Hypercorn's form) as uvicorn's and granian's ``--factory`` form."""
    if app.endswith("()"):
        return ["--factory", app[:-2]]
    return [app]


def keep_alive_args(server: str, seconds: int) -> list[str]:
    """The flags that set ``server``'s keep-alive timeout (granian's is at most 60 s)."""
    if server == "hypercorn":
        return ["--keep-alive", str(seconds)]
    if server == "uvicorn":
        return ["--timeout-keep-alive", str(seconds)]
    return ["--http1-header-read-timeout", str(min(seconds, 60) * 1000)]


def graceful_timeout(server: str, directory: Path | None = None) -> float:
    """The seconds ``server``'s production configuration waits for connections at shutdown
    (granian's master: for a worker to stop)."""
    if server == "hypercorn":
        path = (config_dir() if directory is None else directory) / HYPERCORN_CONFIG
        return float(tomllib.loads(path.read_text())["graceful_timeout"])
    flags = FLAGS[server]
    return float(flags[flags.index(GRACEFUL_TIMEOUT_FLAGS[server]) + 1])
