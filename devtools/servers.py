"""The command lines that serve loopgate under each supported server, and stopping a child process
by its PID.

The command lines and their flags are those of ``loopgate serve``
(:mod:`service.server.commands`), with the repository's configuration files: Hypercorn reads
``hypercorn.toml``; uvicorn and granian take flags (their settings are listed in the README), and
each reads a JSON logging configuration of the repository so that every server writes the same
JSON lines.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from service.server import commands
from service.server.commands import (
    APP,
    FACTORY,
    GRANIAN_FLAGS,
    SERVERS,
    UVICORN_FLAGS,
    keep_alive_args,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SERVER = "hypercorn"

__all__ = [
    "APP",
    "DEFAULT_SERVER",
    "FACTORY",
    "GRANIAN_FLAGS",
    "ROOT",
    "SERVERS",
    "UVICORN_FLAGS",
    "granian_command",
    "hypercorn_command",
    "keep_alive_args",
    "server_command",
    "stop_process",
    "uvicorn_command",
]


def hypercorn_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with ``hypercorn.toml`` on ``bind``."""
    return server_command("hypercorn", bind, workers=workers, app=app, extra=extra)


def uvicorn_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with uvicorn on ``bind`` (flags: see the README)."""
    return server_command("uvicorn", bind, workers=workers, app=app, extra=extra)


def granian_command(
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` with granian on ``bind`` (flags: see the README)."""
    return server_command("granian", bind, workers=workers, app=app, extra=extra)


def server_command(
    server: str,
    bind: str,
    *,
    workers: int | None = None,
    app: str = APP,
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line that serves ``app`` on ``bind`` with ``server`` (one of :data:`SERVERS`),
    with the repository's configuration files."""
    return commands.server_command(
        server, bind, workers=workers, app=app, extra=extra, directory=ROOT
    )


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
