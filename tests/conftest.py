"""Shared fixtures: the real emulators, topics with a verification subscription, the app, and
real Hypercorn servers on loopback."""

from __future__ import annotations

import os
import tempfile

# Imported a second time under another name (``tests.conftest``), this module would point the
# metrics of this process at a new, empty directory: test modules import it as ``conftest``.
if __name__ != "conftest":
    raise ImportError(f"import the test fixtures as `conftest`, not as `{__name__}`")

# Metrics of this test process go to a directory of its own (set before the service is imported).
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="loopgate-test-metrics-")
for _key in [key for key in os.environ if key.startswith("LOOPGATE_")]:
    del os.environ[_key]

import asyncio
import base64
import datetime
import json
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.api_core.exceptions import DeadlineExceeded
from google.cloud import pubsub_v1
from google.protobuf import duration_pb2
from quart import Quart
from quart.typing import TestClientProtocol

from devtools.emulators import PubSubEmulator, free_port
from devtools.servers import DEFAULT_SERVER, SERVERS, server_command
from service import create_app, load_settings
from service.config import Settings

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "loopgate-test"
WAIT = 30.0  # seconds any single wait in a test may take before the test fails


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    emulator = PubSubEmulator().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    yield emulator
    emulator.stop()


@dataclass
class PubSubAdmin:
    """Synchronous Pub/Sub admin for test setup and verification."""

    publisher: pubsub_v1.PublisherClient
    subscriber: pubsub_v1.SubscriberClient
    project: str = PROJECT

    def create_topic(self, name: str | None = None, *, retention: int | None = None) -> str:
        """A new topic; with ``retention``, retaining its messages that many seconds (the
        emulator retains only for a topic created so)."""
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        request: dict[str, Any] = {"name": self.publisher.topic_path(self.project, name)}
        if retention:
            request["message_retention_duration"] = duration_pb2.Duration(seconds=retention)
        self.publisher.create_topic(request=request)
        return name

    def create_subscription(self, topic: str, *, ordering: bool = False) -> str:
        name = f"verify-{uuid.uuid4().hex[:12]}"
        path = self.subscriber.subscription_path(self.project, name)
        self.subscriber.create_subscription(
            request={
                "name": path,
                "topic": self.publisher.topic_path(self.project, topic),
                "enable_message_ordering": ordering,
            }
        )
        return path

    def pull(self, subscription: str, expected: int, timeout: float = WAIT) -> list[Any]:
        """Pull and ack until ``expected`` messages arrived or ``timeout``; then drain briefly
        to catch any extra (unexpected) messages."""
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                response = self.subscriber.pull(
                    request={"subscription": subscription, "max_messages": 1000},
                    timeout=2 if len(received) < expected else 1,
                )
            except DeadlineExceeded:
                if len(received) >= expected:
                    break
                continue
            if not response.received_messages:
                if len(received) >= expected:
                    break
                continue
            received.extend(item.message for item in response.received_messages)
            self.subscriber.acknowledge(
                request={
                    "subscription": subscription,
                    "ack_ids": [item.ack_id for item in response.received_messages],
                }
            )
        return received


@pytest.fixture(scope="session")
def admin(pubsub_emulator: PubSubEmulator) -> Iterator[PubSubAdmin]:
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    yield PubSubAdmin(publisher, subscriber)
    publisher.stop()
    subscriber.close()


@dataclass
class Topic:
    name: str
    subscription: str
    admin: PubSubAdmin

    def received(self, expected: int, timeout: float = WAIT) -> list[Any]:
        return self.admin.pull(self.subscription, expected, timeout)


@pytest.fixture
def topic(admin: PubSubAdmin) -> Topic:
    name = admin.create_topic()
    return Topic(name, admin.create_subscription(name), admin)


def make_settings(**overrides: Any) -> Settings:
    # Authentication is off unless a test turns it on (tests/test_auth.py does). The collector
    # and the allocator are left as they are in this process (real servers started by tests run
    # with both tunings on).
    values: dict[str, Any] = {
        "project": PROJECT,
        "topics": "*",
        "auth": "disabled",
        "gc_tuning": False,
        "malloc_tuning": False,
    }
    values.update(overrides)
    return load_settings({}, **values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def app(pubsub_emulator: PubSubEmulator, settings: Settings) -> AsyncIterator[Quart]:
    app = create_app(settings)
    async with app.test_app():
        yield app


@pytest.fixture
def client(app: Quart) -> TestClientProtocol:
    return app.test_client()


# -- real Hypercorn servers -------------------------------------------------------------------


@dataclass
class Server:
    """A server process on loopback (Hypercorn with the repository's hypercorn.toml, or uvicorn
    or granian with the flags of devtools/servers.py)."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_dir: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = WAIT) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
                raise AssertionError(
                    f"server did not stop within {timeout}s:\n{self.log()}"
                ) from None
        return self.process.returncode


def spawn_server(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    *,
    workers: int = 1,
    port: int | None = None,
    app: str = "service:create_app()",
    args: Sequence[str] = (),
    server: str = DEFAULT_SERVER,
) -> Server:
    port = port or free_port()
    log_path = tmp_path / f"{server}-{port}.log"
    metrics_dir = tempfile.mkdtemp(prefix="metrics-", dir=tmp_path)
    full_env = {key: value for key, value in os.environ.items() if not key.startswith("LOOPGATE_")}
    full_env.update(
        {
            "LOOPGATE_PROJECT": PROJECT,
            "LOOPGATE_TOPICS": "*",
            "LOOPGATE_AUTH": "disabled",  # tests that need authentication pass "enabled"
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
        }
    )
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            server_command(server, f"127.0.0.1:{port}", workers=workers, app=app, extra=args),
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(port, process, log_path, metrics_dir)


async def wait_until_up(server: Server, path: str = "/healthz", timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise AssertionError(
                    f"server exited ({server.process.returncode}):\n{server.log()}"
                )
            try:
                async with session.get(server.url + path) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"server did not answer {path} within {timeout}s:\n{server.log()}")


@pytest.fixture(params=SERVERS)
def server_name(request: pytest.FixtureRequest) -> str:
    """Each supported server in turn: a test that takes it runs once per server."""
    return str(request.param)


# Each server's graceful timeout on its command line (for Granian: how long its master waits for
# a worker to stop before it kills it).
GRACEFUL_TIMEOUT_FLAGS = {
    "hypercorn": "--graceful-timeout",
    "uvicorn": "--timeout-graceful-shutdown",
    "granian": "--workers-kill-timeout",
}


GRANIAN_GRACE = 8  # the least --workers-kill-timeout graceful_timeout() gives Granian


def graceful_timeout(server: str, seconds: int) -> list[str]:
    """The arguments that set ``server``'s graceful timeout to ``seconds``.

    Granian's master kills a worker at the end of it, before the app's lifespan shutdown if that
    has not run yet, and a worker first holds its shutdown back for up to 5 s while its stream
    connections close (service/server/granian/shutdown.py): Granian gets at least 8 s.
    """
    if server == "granian":
        seconds = max(seconds, GRANIAN_GRACE)
    return [GRACEFUL_TIMEOUT_FLAGS[server], str(seconds)]


def clean_exits(server: str, workers: int = 1) -> set[int]:
    """The exit codes of ``server`` stopped by SIGTERM once its shutdown went well.

    A single uvicorn process (``--workers 1``: no supervisor) raises the signal again once its
    shutdown is done, so that it ends as killed by SIGTERM, as uvicorn means it to
    (Kludex/uvicorn#1600); its supervisor, with more workers, exits 0.
    """
    if server == "uvicorn" and workers == 1:
        return {-signal.SIGTERM}
    return {0}


SERVERS_OF_TEST = pytest.StashKey[list[Server]]()
LOG_TAIL = 20_000  # characters of each server's log shown under a failed test


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test's report shows the end of each of its servers' logs."""
    report = yield
    if report.failed:
        for number, server in enumerate(item.stash.get(SERVERS_OF_TEST, []), 1):
            try:
                text = server.log()[-LOG_TAIL:]
            except OSError as error:
                text = f"(no log: {error})"
            report.sections.append((f"server {number} on port {server.port}: log", text))
    return report


@pytest.fixture
def start_server(
    request: pytest.FixtureRequest, tmp_path: Path, pubsub_emulator: PubSubEmulator
) -> Iterator[Callable[..., Any]]:
    servers: list[Server] = []
    request.node.stash[SERVERS_OF_TEST] = servers

    async def start(
        env: dict[str, str] | None = None,
        *,
        workers: int = 1,
        wait: str | None = "/healthz",
        app: str = "service:create_app()",
        args: Sequence[str] = (),
        server: str = DEFAULT_SERVER,
    ) -> Server:
        started = spawn_server(tmp_path, env, workers=workers, app=app, args=args, server=server)
        servers.append(started)
        if wait:
            await wait_until_up(started, wait)
        return started

    yield start
    for server in servers:
        server.stop()


def http_scope(path: str, method: str = "GET") -> dict[str, Any]:
    """An ASGI HTTP scope for calling an app directly (no server, no test client)."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"loopgate")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "extensions": {},
    }


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 when absent."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        metric, _, label_text = sample.partition("{")
        if metric != name:
            continue
        label_text = label_text.rstrip("}")
        got = ",".join(sorted(part for part in label_text.split(",") if part))
        if got == wanted:
            return float(value)
    return 0.0


def run_in_thread(coro_factory: Any) -> Any:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro_factory())
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "the other loop did not finish"
    if "error" in result:
        raise result["error"]
    return result["value"]


def create_topic_at(host: str, name: str, project: str = PROJECT) -> None:
    """Create a topic on the emulator at ``host`` (not the session's one)."""
    import grpc
    from google.pubsub_v1 import PublisherClient as GapicPublisher
    from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

    channel = grpc.insecure_channel(host)
    try:
        GapicPublisher(transport=PublisherGrpcTransport(channel=channel)).create_topic(
            name=f"projects/{project}/topics/{name}"
        )
    finally:
        channel.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses an emulator, so ``-m emulator`` selects them."""
    for item in items:
        if {"pubsub_emulator", "storage_emulator"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.emulator)


# -- Cloud Storage emulator -------------------------------------------------------------------


@pytest.fixture(scope="session")
def storage_emulator() -> Iterator[Any]:
    from devtools.emulators import StorageEmulator

    emulator = StorageEmulator().start()
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
    yield emulator
    emulator.stop()


def create_bucket(emulator: Any, name: str | None = None) -> str:
    """Create a bucket in the storage emulator (synchronously, for test setup)."""
    import json
    import urllib.request

    name = name or f"b-{uuid.uuid4().hex[:12]}"
    request = urllib.request.Request(
        f"{emulator.url}/storage/v1/b?project={PROJECT}",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT) as response:
        assert response.status == 200
    return name


@pytest.fixture
def bucket(storage_emulator: Any) -> str:
    return create_bucket(storage_emulator)


def websocket_handshake(path: str) -> bytes:
    """A websocket opening handshake for ``path``, for a raw socket client."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def subscriber_that_reads_nothing(server: Server, topic: str) -> socket.socket:
    """A websocket subscriber of ``topic`` on a socket with a small receive buffer that is never
    read: unlike a client library's, whose reader keeps taking data in the background, its
    window closes, and the server's writes to it block."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", server.port)), WAIT)
    await loop.sock_sendall(sock, websocket_handshake(f"/v1/topics/{topic}/stream"))
    received = b""
    async with asyncio.timeout(WAIT):  # the handshake's answer and the subscribed frame, no more
        while b'"subscribed"' not in received:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise AssertionError(f"the server closed the websocket: {received[:500]!r}")
            received += chunk
    return sock


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: status, headers (lower-cased), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), WAIT)
    return int(status_line.split()[1]), headers, body


def without_granian_panics(log: str) -> list[str]:
    """``log``'s lines without the panics of Granian's Rust runtime.

    Granian 2.8 often panics as a worker's process ends with a websocket it still holds (in
    the shutdown tests, one whose client reads nothing; in others, now and then, one just
    closed): "Cannot drop pointer into Python heap without the thread being attached"
    (emmett-framework/granian#799, #884), written by its runtime to stderr, with loopgate's
    shutdown hook or without it. The worker still exits; nothing in the app can format those
    lines.
    """
    lines: list[str] = []
    in_panic = False
    for line in log.splitlines():
        if re.match(r"thread '[^']*' \(\d+\) panicked at ", line):
            in_panic = True
        elif line.startswith("{"):
            in_panic = False
        if not in_panic:
            lines.append(line)
    return lines


GRANIAN_KILL = "refused to gracefully stop"  # what Granian's master logs as it kills a worker


def granian_killed_a_late_worker(log: str, kill_timeout: float) -> bool:
    """Whether Granian's master killed a worker for not being gone ``kill_timeout`` seconds (its
    ``--workers-kill-timeout``) after the master's shutdown began.

    Granian 2.8's master (``_stop_workers`` in granian/server/common.py) joins each worker with
    that timeout, then looks once more 1 ms later and kills it if it is still alive. A worker
    whose process is ending at that moment has already closed what ``join`` waits on but is not
    yet gone, and is killed and logged the same way, long before the timeout: such a kill is
    Granian's race, not a worker that held its exit, and does not count.
    """
    began: datetime.datetime | None = None
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = str(entry.get("message", ""))
        if message == "Shutting down granian":
            began = datetime.datetime.fromisoformat(entry["time"])
        elif GRANIAN_KILL in message:
            at = datetime.datetime.fromisoformat(entry["time"])
            if began is None or (at - began).total_seconds() >= kill_timeout - 0.5:
                return True
    return False
