"""The servers under test: start on loopback, wait until they publish, account CPU, stop by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from devtools.servers import stop_process

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system CPU seconds used so far by ``pids`` (ended ones count as zero)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent busy since boot (all processes)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return (sum(values[:8]) - idle) / TICKS


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def post_json(url: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    """POST ``body`` as JSON; the status and the answer (errors included)."""
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class Server:
    """One server under test, a process group of its own started by this benchmark."""

    key: str
    label: str
    command: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)
    _log: IO[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, url_path: str, body: bytes, expected_ids: int, timeout: float) -> None:
        """Wait until a real publish succeeds; then remember the worker PIDs.

        Raises:
            RuntimeError: the server exited, or did not publish within ``timeout``.
        """
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.key} exited at start; see {self.log_path}")
            try:
                status, answer = post_json(self.base_url + url_path, body)
            except OSError as exc:
                last = str(exc)
            else:
                ids = json.loads(answer).get("messageIds") if status == 200 else None
                if isinstance(ids, list) and len(ids) == expected_ids:
                    time.sleep(0.5)  # let every worker finish starting before listing PIDs
                    self.pids = descendants(self.process.pid)
                    return
                last = f"HTTP {status}: {answer[:200]!r}"
            time.sleep(0.3)
        raise RuntimeError(f"{self.key} did not publish within {timeout:g}s ({last})")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids)

    def replaced_workers(self) -> list[int]:
        """The PIDs of processes seen at start that have ended since (a worker its supervisor
        killed and replaced, for instance); the PIDs are then read again for the next runs."""
        gone = [pid for pid in self.pids if not _alive(pid)]
        if gone and self.process is not None and self.process.poll() is None:
            self.pids = descendants(self.process.pid)
        return gone

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the master; SIGKILL it and any worker left after ``timeout``, by PID."""
        process, self.process = self.process, None
        if process is not None:
            stop_tree(process, timeout, known=self.pids)
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_tree(
    process: subprocess.Popen[bytes], timeout: float = 30.0, known: Iterable[int] = ()
) -> None:
    """SIGTERM the server ``process`` started by this benchmark, SIGKILL it after ``timeout``, then
    SIGKILL any of its processes (those below it when asked to stop, or ``known``) still alive 5 s
    later: a worker whose master was killed is never left behind. Only these PIDs are signalled."""
    pids = descendants(process.pid) if process.poll() is None else list(known)
    stop_process(process, timeout)
    deadline = time.monotonic() + 5
    for pid in pids:
        if pid == process.pid:
            continue
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"
