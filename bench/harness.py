"""Shared pieces of the fault and soak runs: emulators, a loopgate server, /proc sampling and the
sections of RESULTS.md.

Everything runs on loopback; the server and the emulators are processes this module starts and
stops by PID.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from devtools.emulators import free_port
from devtools.servers import hypercorn_command, stop_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
PROJECT = "bench"


@dataclass
class Loopgate:
    """``hypercorn --config hypercorn.toml`` on a free loopback port (access log off)."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def workers(self) -> list[int]:
        """PIDs of the worker processes (multiprocessing children running ``spawn_main``)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return []
        found = []
        for child in children:
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    found.append(int(child))
            except FileNotFoundError:
                continue
        return found

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM the master (by PID) and wait; SIGKILL after ``timeout``."""
        stop_process(self.process, timeout)
        if self.process.returncode == 0:  # a failed run keeps its log
            shutil.rmtree(self.log_path.parent, ignore_errors=True)
        return self.process.returncode


def node_client_ready() -> str | None:
    """Make sure the Node.js load clients can run: ``npm ci`` in bench/ when its ``ws`` package
    is missing. ``None`` when ready, else what is wrong (without ``ws`` a client would exit at
    once, and a run would report no connection instead of failing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "the load client needs Node.js 20 or later and npm (apt-get install nodejs npm)"
    bench = Path(__file__).resolve().parent
    if (bench / "node_modules" / "ws" / "package.json").exists():
        return None
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund"],
        cwd=bench,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        return f"npm ci in bench/ failed:\n{done.stdout}\n{done.stderr}"
    return None


def start_loopgate(env: dict[str, str], *, workers: int = 2, wait: float = 60.0) -> Loopgate:
    """Start loopgate with ``env`` added to this process's environment (LOOPGATE_* removed) and
    wait until ``/readyz`` answers 200."""
    return start_server(env, workers=workers, wait=wait)


def start_server(
    env: dict[str, str],
    *,
    app: str = "service:create_app()",
    probe: str = "/readyz",
    any_answer: bool = False,
    workers: int = 2,
    wait: float = 60.0,
) -> Loopgate:
    """Serve ``app`` as :func:`start_loopgate` does, and wait until every worker is up and
    ``probe`` answers 200 (or, with ``any_answer``, answers at all: for apps without a health
    route)."""
    port = free_port()
    scratch = Path(tempfile.mkdtemp(prefix="loopgate-bench-"))
    full = {key: value for key, value in os.environ.items() if not key.startswith("LOOPGATE_")}
    full.update(
        {
            "LOOPGATE_PROJECT": PROJECT,
            "LOOPGATE_TOPICS": "*",
            "PROMETHEUS_MULTIPROC_DIR": str(scratch / "metrics"),
        }
    )
    full.update(env)
    os.makedirs(full["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
    log_path = scratch / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            hypercorn_command(
                f"127.0.0.1:{port}",
                workers=workers,
                app=app,
                extra=["--access-logfile", "/dev/null"],
            ),
            cwd=ROOT,
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Loopgate(process, port, log_path)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{app} exited at start; see {log_path}")
        try:
            with urllib.request.urlopen(f"{server.url}{probe}", timeout=2) as response:
                answered = response.status == 200
        except urllib.error.HTTPError:
            answered = any_answer
        except OSError:
            answered = False
        if answered and len(server.workers()) == workers:
            return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{app} was not ready within {wait:g}s; see {log_path}")


def create_bucket(url: str, name: str) -> None:
    """Create a bucket in the storage emulator at ``url``."""
    request = urllib.request.Request(
        f"{url}/storage/v1/b?project={PROJECT}",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS, KiB); 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid``; 0 once it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


def conditions() -> str:
    """The machine: cores, CPU model, load average now, Python version."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs ({cpu}), load average {load} (1, 5, 15 min) at the start; "
        f"Python {platform.python_version()}; server, emulators and load client on the same machine"
    )


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_section(title: str, lines: list[str]) -> None:
    """Replace (or append) the ``## title`` section of RESULTS.md, keeping the others."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    heading = f"## {title}\n"
    section = heading + "\n" + "\n".join(lines).rstrip("\n") + "\n"
    start = text.find(heading)
    if start == -1:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if end == -1 else text[end:])
    RESULTS.write_text(text)


def create_topics(host: str, topics: tuple[str, ...], subscription: str | None = None) -> None:
    """Create ``topics`` on the Pub/Sub emulator at ``host`` and, when named, a subscription to
    the first one (``subscription`` is its short name)."""
    import grpc
    from google.pubsub_v1 import PublisherClient, SubscriberClient
    from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    channel = grpc.insecure_channel(host)
    try:
        publisher = PublisherClient(transport=PublisherGrpcTransport(channel=channel))
        for topic in topics:
            publisher.create_topic(name=f"projects/{PROJECT}/topics/{topic}")
        if subscription:
            subscriber = SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
            subscriber.create_subscription(
                name=f"projects/{PROJECT}/subscriptions/{subscription}",
                topic=f"projects/{PROJECT}/topics/{topics[0]}",
                ack_deadline_seconds=60,
            )
    finally:
        channel.close()
