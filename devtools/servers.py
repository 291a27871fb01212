"""Starting Hypercorn with the repository's settings, and stopping a child process by its PID."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP = "service:create_app()"


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
