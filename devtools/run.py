"""``make run``: the emulators, the configured topics and the server, all on loopback.

Starts the Pub/Sub and Cloud Storage emulators on free ports, creates the configured topics (and a
``demo`` topic), then runs the server in the foreground: Hypercorn with ``hypercorn.toml`` by
default, or uvicorn or granian with the flags of :mod:`devtools.servers` (``SERVER=uvicorn``).
Ctrl-C or SIGTERM stops the server first (gracefully), then the emulators: nothing is left running.

Authentication stays on: unless ``LOOPGATE_AUTH_FILE`` or ``LOOPGATE_AUTH`` is set, a development
token (scope ``*``) is kept in ``.loopgate/dev-token`` (outside git) and its digest written to
``.loopgate/dev-tokens.toml``; the token is printed with ready-made examples and the address of
the live console (whose origin ``LOOPGATE_ALLOWED_ORIGINS`` allows, unless that is set).

Environment: ``SERVER`` (``hypercorn``, ``uvicorn`` or ``granian``; default ``hypercorn``), ``PORT``
(default 8080) and ``WORKERS`` (default: hypercorn.toml's, or 2); every ``LOOPGATE_*`` variable is
passed through to the service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from google.api_core.exceptions import AlreadyExists
from google.cloud import pubsub_v1
from google.protobuf.duration_pb2 import Duration

from service.auth.tokens import entry_toml, new_token

from .emulators import EmulatorError, PubSubEmulator, StorageEmulator
from .servers import DEFAULT_SERVER, ROOT, SERVERS, server_command, stop_process

DEMO_TOPIC = "demo"
TOPIC_RETENTION = 3600  # seconds the topics made here retain their messages
DEMO_BUCKET = "demo"  # created in the storage emulator and allowed unless LOOPGATE_BUCKETS is set
DEFAULT_PROJECT = "loopgate-local"
DEV_DIR = ROOT / ".loopgate"
# The stream route the websocket example uses.
STREAM_EXAMPLE_PATH = f"/v1/topics/{DEMO_TOPIC}/stream"


def dev_token(directory: Path = DEV_DIR) -> tuple[str, Path]:
    """The development token (made once, then reused) and the token file that admits it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    token_path = directory / "dev-token"
    token = token_path.read_text().strip() if token_path.exists() else ""
    if not token:
        token = new_token()
        token_path.touch(mode=0o600)
        token_path.write_text(token + "\n")
    tokens_path = directory / "dev-tokens.toml"
    tokens_path.write_text(
        "# Development token for `make run` (scope *). Not for production.\n"
        + entry_toml("dev", token, ["*"])
    )
    return token, tokens_path


def create_topics(project: str, topics: list[str]) -> None:
    """Create ``topics`` in the emulator named by ``PUBSUB_EMULATOR_HOST``, each retaining its
    messages for :data:`TOPIC_RETENTION` seconds: a subscriber reconnecting after a restart is
    caught up from that retention (the emulator retains only when a topic is created so)."""
    publisher = pubsub_v1.PublisherClient()
    try:
        for topic in topics:
            try:
                publisher.create_topic(
                    request={
                        "name": publisher.topic_path(project, topic),
                        "message_retention_duration": Duration(seconds=TOPIC_RETENTION),
                    }
                )
            except AlreadyExists:
                pass
    finally:
        publisher.stop()


def create_bucket(storage_url: str, project: str, bucket: str) -> None:
    """Create ``bucket`` in the Cloud Storage emulator at ``storage_url`` (if it is missing)."""
    request = urllib.request.Request(
        f"{storage_url}/storage/v1/b?project={project}",
        data=json.dumps({"name": bucket}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise


def wait_http(url: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:g}s")


def main() -> int:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    port = int(os.environ.get("PORT", "8080"))
    server_name = os.environ.get("SERVER") or DEFAULT_SERVER
    if server_name not in SERVERS:
        print(f"error: SERVER={server_name}: choose one of {', '.join(SERVERS)}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("LOOPGATE_PROJECT", DEFAULT_PROJECT)
    env.setdefault("LOOPGATE_TOPICS", DEMO_TOPIC)
    token = ""
    if "LOOPGATE_AUTH_FILE" not in env and "LOOPGATE_AUTH" not in env:
        token, tokens_path = dev_token()
        env["LOOPGATE_AUTH_FILE"] = str(tokens_path)
    env.setdefault("LOOPGATE_BUCKETS", DEMO_BUCKET)
    # The console's own page opens websockets: its origin must be allowed.
    env.setdefault("LOOPGATE_ALLOWED_ORIGINS", f"http://127.0.0.1:{port},http://localhost:{port}")
    topics = sorted(
        {DEMO_TOPIC} | {t.strip() for t in env["LOOPGATE_TOPICS"].split(",") if t.strip() != "*"}
    )

    try:
        pubsub = PubSubEmulator()
    except EmulatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    storage = StorageEmulator()
    server: subprocess.Popen[bytes] | None = None
    try:
        print(f"starting the Pub/Sub emulator on {pubsub.host} ...", flush=True)
        pubsub.start()
        print(f"starting the Cloud Storage emulator on {storage.host} ...", flush=True)
        storage.start()
        env["PUBSUB_EMULATOR_HOST"] = os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        env["STORAGE_EMULATOR_HOST"] = storage.url
        create_topics(env["LOOPGATE_PROJECT"], topics)
        create_bucket(storage.url, env["LOOPGATE_PROJECT"], DEMO_BUCKET)

        workers = int(os.environ["WORKERS"]) if os.environ.get("WORKERS") else None
        command = server_command(server_name, f"127.0.0.1:{port}", workers=workers)
        server = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz", 60, server)
        auth = f"-H 'Authorization: Bearer {token}' " if token else ""
        print(
            f"\nloopgate is running on {base} under {server_name}  (Ctrl-C stops everything)\n"
            f"  project {env['LOOPGATE_PROJECT']}, topics: {', '.join(topics)}\n"
            f"  console: {base}/console"
            + ("  (paste the token printed below)\n" if token else "\n")
            + f"  docs:    {base}/docs\n"
            f"  ready:   {base}/readyz\n"
            f"  metrics: {base}/metrics\n"
            + (f"  token:   {token}  (development token, scope *)\n" if token else "")
            + f"  publish: curl -s -X POST {base}/v1/topics/{DEMO_TOPIC}:publish {auth}"
            "-H 'Content-Type: application/json' "
            '-d \'{"messages": [{"data": "aGVsbG8="}]}\'\n'
            f"  storage: curl -s {auth}-T README.md "
            f"{base}/v1/buckets/{DEMO_BUCKET}/objects/readme.md "
            f"&& curl -s {auth}{base}/v1/buckets/{DEMO_BUCKET}/objects\n"
            + (
                f"  websocket: websocat 'ws://127.0.0.1:{port}{STREAM_EXAMPLE_PATH}"
                f"?access_token={token}'\n"
                if token
                else ""
            ),
            flush=True,
        )
        while not stop.is_set() and server.poll() is None:
            stop.wait(0.5)
        return 0 if stop.is_set() else (server.returncode or 1)
    except (EmulatorError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            stop_process(server, timeout=60)
        storage.stop()
        pubsub.stop()
        print("stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
