"""The JavaScript client (service/web/loopgate.js) under Node, against a real server and emulator.

The Node tests are ``tests/js/*.test.mjs`` (``node --test``, the ``ws`` package for websockets,
installed by ``npm ci`` in tests/js when missing). This module starts a loopgate server with
authentication on and a small control server that the Node tests call to create topics, publish
straight to Pub/Sub, and stop and start the loopgate server (same port), then runs ``node --test``
and fails with Node's output when a Node test fails.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import uuid
from pathlib import Path
from typing import Any

import jskit
import pytest
from aiohttp import web
from authkit import new_token, write_tokens
from conftest import PROJECT, ROOT, WAIT, PubSubAdmin, Server, spawn_server, wait_until_up
from google.protobuf import duration_pb2

from devtools.emulators import free_port

NODE_TIMEOUT = 480.0  # seconds for the whole Node run (several server restarts)


class Control:
    """What the Node tests ask of this process, over HTTP: topics, direct publishes, restarts."""

    def __init__(self, admin: PubSubAdmin, tmp_path: Path, env: dict[str, str]) -> None:
        self.admin = admin
        self.tmp_path = tmp_path
        self.env = env
        self.port = free_port()
        self.server: Server | None = None
        self.lock = asyncio.Lock()

    async def start_server(self) -> Server:
        self.server = spawn_server(self.tmp_path, self.env, port=self.port)
        await wait_until_up(self.server)
        return self.server

    async def stop_server(self) -> None:
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/topics", self.topics)
        app.router.add_post("/publish", self.publish)
        app.router.add_post("/stop", self.stop)
        app.router.add_post("/start", self.start)
        return app

    async def topics(self, request: web.Request) -> web.Response:
        """A new topic that retains its messages for an hour (so that resuming finds them)."""
        name = f"js-{uuid.uuid4().hex[:12]}"
        await asyncio.to_thread(
            self.admin.publisher.create_topic,
            request={
                "name": self.admin.publisher.topic_path(PROJECT, name),
                "message_retention_duration": duration_pb2.Duration(seconds=3600),
            },
        )
        return web.json_response({"name": name})

    async def publish(self, request: web.Request) -> web.Response:
        """Publish to Pub/Sub directly (while loopgate is down): ``{topic, data, attributes}``."""
        body: dict[str, Any] = await request.json()
        path = self.admin.publisher.topic_path(PROJECT, body["topic"])
        future = self.admin.publisher.publish(
            path, base64.b64decode(body.get("data", "")), **body.get("attributes", {})
        )
        message_id = await asyncio.to_thread(future.result, WAIT)
        return web.json_response({"messageId": message_id})

    async def stop(self, request: web.Request) -> web.Response:
        async with self.lock:
            await self.stop_server()
        return web.json_response({})

    async def start(self, request: web.Request) -> web.Response:
        async with self.lock:
            await self.start_server()
        return web.json_response({})


@pytest.mark.timeout(NODE_TIMEOUT + 120)
async def test_the_javascript_client_under_node(
    tmp_path: Path, admin: PubSubAdmin, pubsub_emulator: Any
) -> None:
    node = jskit.node()
    jskit.npm_install()
    token, unscoped = new_token(), new_token()
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {
            "js": (token, ["subscribe:js-*", "publish:js-*"]),
            "unscoped": (unscoped, ["publish:nothing-here"]),
        },
    )
    env = {
        "LOOPGATE_AUTH": "enabled",
        "LOOPGATE_AUTH_FILE": str(tokens),
        "LOOPGATE_FANOUT_GRACE": "1",
    }
    control = Control(admin, tmp_path, env)
    await control.start_server()
    runner = web.AppRunner(control.app())
    await runner.setup()
    control_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    node_env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("LOOPGATE_")},
        "JS_TEST_BASE_URL": f"http://127.0.0.1:{control.port}",
        "JS_TEST_CONTROL_URL": f"http://127.0.0.1:{control_port}",
        "JS_TEST_TOKEN": token,
        "JS_TEST_UNSCOPED_TOKEN": unscoped,
        "JS_TEST_CLIENT": str(ROOT / "service" / "web" / "loopgate.js"),
        "JS_TEST_WAIT_MS": str(int(WAIT * 1000)),
    }
    try:
        process = await asyncio.create_subprocess_exec(
            node,
            "--test",
            "--test-concurrency=1",  # the restart tests stop the server the others use
            "--test-reporter=spec",
            str(jskit.JS_TESTS),
            cwd=ROOT,
            env=node_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
        except TimeoutError:
            process.kill()
            output, _ = await process.communicate()
            pytest.fail(f"node --test took over {NODE_TIMEOUT}s:\n{output.decode()}")
    finally:
        await runner.cleanup()
        await control.stop_server()
    text = output.decode(errors="replace")
    server_log = control.server.log() if control.server is not None else ""
    assert process.returncode == 0, f"node --test failed:\n{text}\n--- server log:\n{server_log}"
    counts = dict(re.findall(r"^\S*\s*(pass|fail|cancelled) (\d+)$", text, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("cancelled") == "0", text
    assert int(counts.get("pass", "0")) > 0, f"node ran no test:\n{text}"
