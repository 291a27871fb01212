"""Hostile clients against one real server with authentication on and the Pub/Sub emulator: each
case is short, and each one is something a client could do to hurt the service. The limits a
server must keep run against each supported server (``server_target``); the others against
Hypercorn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohappyeyeballs import AddrInfoType
from authkit import JWT_SECRET, bearer, make_jwt, new_token, write_tokens
from conftest import (
    WAIT,
    PubSubAdmin,
    Server,
    read_response,
    run_in_thread,
    spawn_server,
    wait_until_up,
)

from bench.procs import descendants

pytestmark = [pytest.mark.server, pytest.mark.emulator]

TOKEN = new_token()
ORIGIN = "https://app.example.com"
BODY = {"messages": [{"data": base64.b64encode(b"hostile").decode()}]}
MIB = 1024 * 1024


@dataclass
class Target:
    server: Server
    topic: str
    admin: PubSubAdmin

    def url(self, path: str) -> str:
        return self.server.url + path

    def new_subscription(self) -> str:
        """A fresh queue-mode subscription of the topic (the server serves them all)."""
        return self.admin.create_subscription(self.topic).rsplit("/", 1)[1]


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, pubsub_emulator: Any, admin: PubSubAdmin
) -> Iterator[Callable[[str], Target]]:
    """A target served by the server named, started on first use and kept for the module."""
    tmp = tmp_path_factory.mktemp("hostile")
    tokens = write_tokens(tmp / "tokens.toml", {"client": (TOKEN, ["*"])})
    started: dict[str, Target] = {}

    def serve(name: str) -> Target:
        if name not in started:
            server = spawn_server(
                tmp,
                {
                    "LOOPGATE_AUTH": "enabled",
                    "LOOPGATE_AUTH_FILE": str(tokens),
                    "LOOPGATE_JWT_SECRET": JWT_SECRET,
                    "LOOPGATE_JWT_AUDIENCE": "loopgate",
                    "LOOPGATE_ALLOWED_ORIGINS": ORIGIN,
                    "LOOPGATE_SUBSCRIPTIONS": "*",
                },
                server=name,
            )
            started[name] = Target(server, admin.create_topic(), admin)
            run_in_thread(lambda: wait_until_up(server))
        return started[name]

    try:
        yield serve
    finally:
        for target in started.values():
            target.server.stop()


@pytest.fixture
def target(servers: Callable[[str], Target]) -> Target:
    return servers("hypercorn")


@pytest.fixture
def server_target(servers: Callable[[str], Target], server_name: str) -> Target:
    return servers(server_name)


def worker_pid(server: Server) -> int:
    """The server's one worker process: Hypercorn's or granian's child (not multiprocessing's
    resource tracker), or uvicorn's one process."""
    processes = [
        pid
        for pid in descendants(server.process.pid)
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    if len(processes) == 1:
        return processes[0]
    (pid,) = [pid for pid in processes if pid != server.process.pid]
    return pid


def peak_rss(pid: int) -> int:
    """The highest resident set size of ``pid`` so far, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for {pid}")


def small_receive_buffer(addr_info: AddrInfoType) -> socket.socket:
    """A client socket whose receive buffer stays small: a client that does not read stops the
    server's writes after a few MiB, instead of after the tens of MiB Linux may grow it to."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return sock


def slow_reader_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    )


async def open_queue(
    session: aiohttp.ClientSession, target: Target, subscription: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(
        target.url(f"/v1/subscriptions/{subscription}/stream"),
        headers=bearer(TOKEN),
        max_msg_size=0,
    )
    first = await asyncio.wait_for(ws.receive_json(), WAIT)
    assert first == {"type": "subscribed", "subscription": subscription}
    return ws


async def read_answers(ws: aiohttp.ClientWebSocketResponse, frames: int) -> list[str]:
    """The error notices that answer ``frames`` bad frames: one each, or a notice that counts
    ``dropped`` answers the server did not keep for a client that was not reading."""
    texts: list[str] = []
    answered = 0
    async with asyncio.timeout(WAIT):
        while answered < frames:
            message = await ws.receive()
            assert message.type == aiohttp.WSMsgType.TEXT, (message, answered)
            notice = json.loads(message.data)
            assert notice["type"] == "error", notice
            texts.append(message.data)
            answered += notice.get("dropped", 1)
    assert answered == frames
    return texts


# -- queue mode -------------------------------------------------------------------------------


async def test_a_deeply_nested_frame_is_answered_and_acks_keep_working(target: Target) -> None:
    subscription = target.new_subscription()
    async with aiohttp.ClientSession() as session:
        ws = await open_queue(session, target, subscription)
        async with session.post(
            target.url(f"/v1/topics/{target.topic}:publish"), json=BODY, headers=bearer(TOKEN)
        ) as response:
            assert response.status == 200
        held = await asyncio.wait_for(ws.receive_json(), WAIT)
        assert held["type"] == "message"
        await ws.send_str("[" * 200_000)  # json.loads raises RecursionError, not ValueError
        (answer,) = await read_answers(ws, 1)
        assert "expected" in json.loads(answer)["message"]
        await ws.send_json({"ack": [held["ackId"]]})
        await ws.send_json({"ack": [held["ackId"], "x"]})  # the first ack took it: now unknown
        (unknown,) = await read_answers(ws, 1)
        assert json.loads(unknown)["ackIds"] == [held["ackId"], "x"]
        await ws.close()


async def test_a_flood_of_huge_unknown_ids_is_answered_in_small_notices(target: Target) -> None:
    subscription = target.new_subscription()
    pid = worker_pid(target.server)
    async with slow_reader_session() as session:
        ws = await open_queue(session, target, subscription)
        before = peak_rss(pid)
        frame = json.dumps({"nack": ["z" * 200_000]})
        for _ in range(800):  # 160 MB sent without reading: each answer used to echo the id
            await ws.send_str(frame)
        texts = await read_answers(ws, 800)
        grown = peak_rss(pid) - before
        await ws.close()
    assert grown < 30 * MIB, f"the worker grew {grown / MIB:.0f} MiB"
    assert max(len(text) for text in texts) < 8192


async def test_notices_for_a_client_that_does_not_read_are_bounded(target: Target) -> None:
    subscription = target.new_subscription()
    async with slow_reader_session() as session:
        ws = await open_queue(session, target, subscription)
        ids = [f"{i:04}-{uuid.uuid4().hex}".ljust(400, "x") for i in range(10)]
        frame = json.dumps({"nack": ids})
        for _ in range(4000):  # 16 MB of answers: far more than the socket buffers hold
            await ws.send_str(frame)
        texts = await read_answers(ws, 4000)
        await ws.close()
    # The server kept a few answers for the client and counted the rest instead of queueing them
    # (read_answers checked that the counts and the answers add up to every frame sent).
    assert any("dropped" in json.loads(text) for text in texts)
    assert len(texts) < 4000


# -- cases that already hold: quick checks so that a regression shows -------------------------


async def test_publish_without_or_with_a_bad_token_is_401(target: Target) -> None:
    url = target.url(f"/v1/topics/{target.topic}:publish")
    async with aiohttp.ClientSession() as session:
        for headers in ({}, bearer("lg_not-a-known-token"), bearer(TOKEN + "x")):
            async with session.post(url, json=BODY, headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.post(url, json=BODY, headers=bearer(TOKEN)) as response:
            assert response.status == 200


async def test_websocket_without_or_with_a_bad_token_is_refused_at_the_handshake(
    target: Target,
) -> None:
    subscription = target.new_subscription()
    async with aiohttp.ClientSession() as session:
        for path in (
            f"/v1/topics/{target.topic}/stream",
            f"/v1/subscriptions/{subscription}/stream",
        ):
            for query in ("", "?access_token=lg_not-a-known-token"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await session.ws_connect(target.url(path + query))
                assert refused.value.status == 401, path + query
            ws = await session.ws_connect(target.url(f"{path}?access_token={TOKEN}"))
            assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
            await ws.close()


def unsigned_jwt(claims: dict[str, Any]) -> str:
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_a_jwt_with_alg_none_is_refused(target: Target) -> None:
    url = target.url(f"/v1/topics/{target.topic}:publish")
    claims = {"sub": "mallory", "scope": "*", "aud": "loopgate", "exp": int(time.time()) + 300}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=BODY, headers=bearer(unsigned_jwt(claims))) as response:
            assert response.status == 401
        signed = make_jwt("*", aud="loopgate", sub="mallory")
        async with session.post(url, json=BODY, headers=bearer(signed)) as response:
            assert response.status == 200


async def test_a_websocket_from_a_disallowed_origin_is_refused(target: Target) -> None:
    url = target.url(f"/v1/topics/{target.topic}/stream")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(
                url, headers={**bearer(TOKEN), "Origin": "https://evil.example"}
            )
        assert refused.value.status == 403
        ws = await session.ws_connect(url, headers={**bearer(TOKEN), "Origin": ORIGIN})
        assert (await asyncio.wait_for(ws.receive_json(), WAIT))["type"] == "subscribed"
        await ws.close()


# Granian may end a request's body when the response starts while a receive is waiting for it
# (as Quart's always is; in some runs it does, in others not): it then closes the connection
# under a client still sending, whose writes end in a reset that may come before it reads the
# answer. Under the other servers the rest of the body is read and dropped before the response
# ends (service/server/request_body.py). Upstream: emmett-framework/granian#616 (answering
# before the body is read), open.
GRANIAN_CLOSES = "granian may close a connection whose body is unread when the answer starts"


async def test_an_oversized_publish_body_is_413(server_target: Target, server_name: str) -> None:
    # The 413 comes before the body is all sent.
    data = base64.b64encode(b"x" * (8 * MIB)).decode()  # 10.7 MiB of JSON: over the 10 MiB limit
    body = io.BytesIO(json.dumps({"messages": [{"data": data}]}).encode())
    async with aiohttp.ClientSession() as session:
        try:
            async with session.post(
                server_target.url(f"/v1/topics/{server_target.topic}:publish"),
                data=body,
                headers={**bearer(TOKEN), "Content-Type": "application/json"},
            ) as response:
                drop = connection_dropper(response)
                assert response.status == 413
                assert (await response.json())["error"]["status"] == "PAYLOAD_TOO_LARGE"
            await drop()
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            if server_name != "granian":
                raise
            # GRANIAN_CLOSES: the reset came before the answer was read


async def test_a_client_that_sends_all_of_an_oversized_body_before_reading_gets_the_413(
    server_target: Target, server_name: str
) -> None:
    # More body than the loopback socket buffers hold: unless the server reads the rest of it
    # after refusing it, the client's writes end in a reset, and the 413 is lost with them.
    # Under granian that happens in some runs and not in others (GRANIAN_CLOSES): there the test
    # asks only for the 413 or a reset, never another answer.
    size = 32 * MIB
    head = (
        f"POST /v1/topics/{server_target.topic}:publish HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", server_target.server.port), WAIT
    )
    try:
        writer.write(head)
        chunk = b"x" * MIB
        for _ in range(size // MIB):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), WAIT)
        status, _, body = await read_response(reader)
    except ConnectionError:
        if server_name != "granian":
            raise
        return  # GRANIAN_CLOSES
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), WAIT)
    assert status == 413
    assert json.loads(body)["error"]["status"] == "PAYLOAD_TOO_LARGE"


def connection_dropper(response: aiohttp.ClientResponse) -> Callable[[], Awaitable[None]]:
    """What closes the connection of a response that came before its request's body was sent.

    aiohttp closes such a connection gracefully: its transport stays open until the rest of the
    body is written. Left so when the test's event loop closes, the transport is collected later
    with a ResourceWarning that fails whichever test is running then.
    """
    connection = response.connection
    assert connection is not None and connection.transport is not None
    transport, protocol = connection.transport, connection.protocol
    closed = protocol.closed if protocol is not None else None

    async def drop() -> None:
        transport.abort()
        if closed is not None:  # None: the connection was lost already
            with contextlib.suppress(aiohttp.ClientConnectionError):  # lost to a reset first
                await asyncio.wait_for(closed, WAIT)

    return drop


async def test_an_oversized_websocket_frame_is_closed_with_1009(server_target: Target) -> None:
    subscription = server_target.new_subscription()
    async with aiohttp.ClientSession() as session:
        ws = await open_queue(session, server_target, subscription)
        await ws.send_str(json.dumps({"ack": ["x" * 300_000]}))  # over websocket_max_message_size
        message = await ws.receive(timeout=WAIT)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1009


async def test_malformed_publish_json_is_400(target: Target) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(
            target.url(f"/v1/topics/{target.topic}:publish"),
            data=b'{"messages": [',
            headers={**bearer(TOKEN), "Content-Type": "application/json"},
        ) as response:
            assert response.status == 400
            assert (await response.json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_a_header_flood_is_refused(server_target: Target) -> None:
    url = server_target.url(f"/v1/topics/{server_target.topic}:publish")
    many = {f"X-Flood-{i}": "x" * 40 for i in range(2000)}  # ~100 KB in many headers
    one = {"X-Padding": "x" * 100_000}  # ~100 KB in one
    async with aiohttp.ClientSession() as session:
        for flood in (many, one):
            status: int | None
            try:
                async with session.post(
                    url, json=BODY, headers={**bearer(TOKEN), **flood}
                ) as response:
                    status = response.status
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                status = None  # the server may close before the client has sent the whole head
            assert status in (431, None), len(flood)
