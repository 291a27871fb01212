"""Start the Pub/Sub and Cloud Storage emulators on free loopback ports, and stop them.

Used by ``make run`` and by the test suite. Each emulator is a child process that only this module
stops, by its PID.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import IO

from .servers import stop_process

SDK_ROOTS = ("/usr/lib/google-cloud-sdk", "/usr/share/google-cloud-sdk", "/google-cloud-sdk")
PUBSUB_LAUNCHER = "platform/pubsub-emulator/bin/cloud-pubsub-emulator"
PUBSUB_PACKAGE = "google-cloud-cli-pubsub-emulator"


class EmulatorError(RuntimeError):
    """An emulator is missing or did not start."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pubsub_launcher() -> Path:
    """The Pub/Sub emulator's launcher script.

    Raises:
        EmulatorError: not installed; the message names the Debian package.
    """
    roots = [os.environ["CLOUDSDK_ROOT_DIR"]] if os.environ.get("CLOUDSDK_ROOT_DIR") else []
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(str(Path(gcloud).resolve().parent.parent))
    for root in [*roots, *SDK_ROOTS]:
        launcher = Path(root) / PUBSUB_LAUNCHER
        if launcher.is_file():
            return launcher
    raise EmulatorError(
        f"the Pub/Sub emulator is not installed: install the Debian package {PUBSUB_PACKAGE} "
        f"(apt-get install {PUBSUB_PACKAGE}); it needs Java"
    )


class Emulator:
    """A child process serving on ``127.0.0.1:port``."""

    name = "emulator"
    env_var = ""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> Emulator:
        """Start the process and wait until it serves; the port is kept across restarts."""
        fd, path = tempfile.mkstemp(prefix=f"loopgate-{self.name}-", suffix=".log")
        self.log_path = Path(path)
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(
            self.command(),
            cwd=Path(__file__).resolve().parents[1],  # the repository: ``-m devtools...`` works
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches only our launcher, which stops us
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmulatorError(f"{self.name} exited at start: {self.tail()}")
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise EmulatorError(f"{self.name} did not start within {timeout:g}s: {self.tail()}")

    def tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the process this object started (by its PID) and wait for it."""
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)
            self.log_path = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PubSubEmulator(Emulator):
    """Google's Pub/Sub emulator (Java); ready when it logs "Server started"."""

    name = "pubsub-emulator"
    env_var = "PUBSUB_EMULATOR_HOST"

    def __init__(self, port: int | None = None) -> None:
        self.launcher = pubsub_launcher()
        super().__init__(port)

    def command(self) -> list[str]:
        # The launcher execs java, so the PID we hold is the emulator's own.
        return [str(self.launcher), "--host=127.0.0.1", f"--port={self.port}"]

    def ready(self) -> bool:
        return "Server started" in self.tail()


class StorageEmulator(Emulator):
    """gcp-storage-emulator, in memory."""

    name = "storage-emulator"
    env_var = "STORAGE_EMULATOR_HOST"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "devtools.storage_emulator",  # refuses truncated bodies, as Cloud Storage does
            "start",
            "--host=127.0.0.1",
            f"--port={self.port}",
            "--in-memory",
            "--quiet",
        ]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False
