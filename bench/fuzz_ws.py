"""Fuzz the websocket protocol: random and malformed frames in queue mode and in fan-out.

Starts its own Pub/Sub emulator and loopgate (1 worker, authentication disabled) on loopback. For
``--seconds`` it runs ``--clients`` hostile websockets at once, on the fan-out route
(``/v1/topics/{topic}/stream``) and on queue mode (``/v1/subscriptions/{sub}/stream``). Each
sends frames drawn at random from: random bytes as text and as binary frames, JSON of random
shape, deeply nested arrays, settlements with huge, unknown, duplicate or non-string ids, frames
near and over the server's size limit, and pings; some read what they are sent, some never read,
and some drop the connection mid-frame. Meanwhile a well-behaved subscriber on each route must go
on receiving every message published to it, and the worker's memory (VmRSS, VmHWM) and open file
descriptors are sampled.

It fails (exit status 1) if the worker dies, a well-behaved subscriber misses a message, the
server answers a frame with something other than an error frame or a close with a documented
code (1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013), a subscriber is still counted once every
client is gone, or the worker's RSS stays more than ``--rss-slack`` MiB above its level before
the fuzzing (measured at this commit: +89 MiB after 15 s and +107 MiB after 40 s of 20 clients,
so the retained heap grows far slower than the frames sent; before Hypercorn's message limit was
kept, 20 s left +1,012 MiB).

Run with ``python -m bench.fuzz_ws --seconds 60``. Bounded in time and count; it stops every
process it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from devtools.emulators import PubSubEmulator

from .harness import PROJECT, Loopgate, create_topics, open_fds, rss_kib, start_loopgate

TOPIC = "fuzz"
SUBSCRIPTION = "fuzz-queue"
ALLOWED_CLOSES = {1000, 1001, 1003, 1007, 1008, 1009, 1011, 1013}
MAX_FRAME = 256 * 1024  # hypercorn.toml's websocket_max_message_size


@dataclass
class Tally:
    frames_sent: Counter[str] = field(default_factory=Counter)
    closes: Counter[int] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    connections: int = 0


KINDS = (
    "bytes-text",
    "binary",
    "json-shape",
    "deep",
    "huge-ids",
    "unknown-ids",
    "odd-ids",
    "near-limit",
    "over-limit",
    "empty",
    "utf8-edge",
)


def random_frame(rng: random.Random, kinds: tuple[str, ...] = KINDS) -> tuple[str, str | bytes]:
    """One frame: (kind, payload)."""
    kind = rng.choice(kinds)
    if kind == "bytes-text":
        return kind, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512))).decode("latin-1")
    if kind == "binary":
        return kind, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 2048)))
    if kind == "json-shape":
        value: object = rng.choice(
            [
                {"ack": rng.randint(-5, 5)},
                {"nack": None},
                [1, 2, 3],
                "ack",
                {"ack": [], "nack": [], "x": {"y": [1]}},
                {"ack": [{"id": 1}]},
                1e308,
                {"ack": ["a"] * rng.randint(0, 5000)},
            ]
        )
        return kind, json.dumps(value)
    if kind == "deep":
        depth = rng.choice([100, 1000, 50_000, 120_000])
        return kind, rng.choice(["[", '{"a":']) * depth
    if kind == "huge-ids":
        return kind, json.dumps({"nack": ["z" * rng.randint(1000, 200_000)]})
    if kind == "unknown-ids":
        return kind, json.dumps({"ack": [f"id-{rng.getrandbits(64):x}" for _ in range(200)]})
    if kind == "odd-ids":
        return kind, json.dumps({"ack": ["", "\u0000", "é" * 50, "a" * 512] * 3})
    if kind == "near-limit":
        return kind, json.dumps({"ack": ["x" * (MAX_FRAME - 20)]})[: MAX_FRAME - 1]
    if kind == "over-limit":
        return kind, "x" * (MAX_FRAME + rng.randint(1, 4096))
    if kind == "utf8-edge":
        return kind, "\U0010ffff\u2028\u2029\ufeff" * rng.randint(1, 200)
    return kind, ""


async def hostile(
    session: aiohttp.ClientSession,
    url: str,
    rng: random.Random,
    until: float,
    tally: Tally,
    kinds: tuple[str, ...],
) -> None:
    reads = rng.random() < 0.6
    while time.monotonic() < until:
        tally.connections += 1
        try:
            ws = await session.ws_connect(url, max_msg_size=0)
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.replies[f"connect failed: {type(exc).__name__}"] += 1
            await asyncio.sleep(0.2)
            continue
        reader = asyncio.create_task(read_replies(ws, tally)) if reads else None
        try:
            for _ in range(rng.randint(1, 200)):
                if ws.closed or time.monotonic() > until:
                    break
                kind, payload = random_frame(rng, kinds)
                tally.frames_sent[kind] += 1
                if isinstance(payload, bytes):
                    await ws.send_bytes(payload)
                else:
                    await ws.send_str(payload)
                if rng.random() < 0.02:  # drop the connection without a close frame
                    connection = getattr(getattr(ws, "_response", None), "connection", None)
                    transport = getattr(connection, "transport", None)
                    if transport is not None:
                        transport.abort()
                    break
        except (aiohttp.ClientError, ConnectionError, RuntimeError):
            pass
        finally:
            if reader is not None:
                try:
                    await asyncio.wait_for(reader, 2)
                except (TimeoutError, aiohttp.ClientError):
                    reader.cancel()
            if not ws.closed:
                await ws.close()
            if ws.close_code is not None:
                tally.closes[ws.close_code] += 1
                if ws.close_code not in ALLOWED_CLOSES and ws.close_code != 1006:
                    tally.violations.append(f"close code {ws.close_code}")


async def read_replies(ws: aiohttp.ClientWebSocketResponse, tally: Tally) -> None:
    async for message in ws:
        if message.type != aiohttp.WSMsgType.TEXT:
            continue
        try:
            kind = json.loads(message.data).get("type", "?")
        except (ValueError, AttributeError):
            tally.violations.append(f"a reply that is not a JSON object: {message.data[:80]!r}")
            continue
        tally.replies[kind] += 1


async def watcher(
    session: aiohttp.ClientSession, server: Loopgate, until: float
) -> tuple[int, int, list[str]]:
    """A well-behaved fan-out subscriber while messages are published: (published, received)."""
    ws = await session.ws_connect(f"{server.url}/v1/topics/{TOPIC}/stream", max_msg_size=0)
    assert (await ws.receive_json(timeout=30))["type"] == "subscribed"
    received: set[str] = set()
    problems: list[str] = []

    async def read() -> None:
        async for message in ws:
            frame = json.loads(message.data)
            for item in frame.get("messages") or ([frame] if frame["type"] == "message" else []):
                received.add(item["messageId"])

    reading = asyncio.create_task(read())
    published: list[str] = []
    data = base64.b64encode(b"watch").decode()
    while time.monotonic() < until:
        try:
            async with session.post(
                f"{server.url}/v1/topics/{TOPIC}:publish", json={"messages": [{"data": data}] * 20}
            ) as response:
                if response.status != 200:
                    problems.append(f"publish answered {response.status}")
                else:
                    published += (await response.json())["messageIds"]
        except aiohttp.ClientError as exc:
            problems.append(f"publish failed: {exc!r}")
        await asyncio.sleep(0.2)
    deadline = time.monotonic() + 30
    while set(published) - received and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.2)
    reading.cancel()
    await ws.close()
    missing = len(set(published) - received)
    if missing:
        problems.append(f"the well-behaved subscriber missed {missing} of {len(published)}")
    return len(published), len(received & set(published)), problems


async def fuzz(
    server: Loopgate, seconds: float, clients: int, seed: int, kinds: tuple[str, ...], routes: str
) -> tuple[Tally, list[str]]:
    rng = random.Random(seed)
    tally = Tally()
    until = time.monotonic() + seconds
    urls = [
        url
        for name, url in (
            ("fanout", f"{server.url}/v1/topics/{TOPIC}/stream"),
            ("queue", f"{server.url}/v1/subscriptions/{SUBSCRIPTION}/stream"),
        )
        if routes in ("both", name)
    ]
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as calm:
        watch = asyncio.create_task(watcher(calm, server, until))
        await asyncio.gather(
            *(
                hostile(
                    session,
                    urls[i % len(urls)],
                    random.Random(rng.getrandbits(32)),
                    until,
                    tally,
                    kinds,
                )
                for i in range(clients)
            )
        )
        published, received, problems = await watch
    lines = [f"- well-behaved subscriber: {received} of {published} published messages received"]
    return tally, lines + [f"- problem: {p}" for p in problems]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rss-slack", type=float, default=160.0, help="MiB")
    parser.add_argument("--kinds", default=",".join(KINDS), help="frame kinds to send")
    parser.add_argument("--routes", choices=["both", "fanout", "queue"], default="both")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = parser.parse_args()
    if not 5 <= args.seconds <= 1800 or not 1 <= args.clients <= 500:
        parser.error("--seconds must be within 5-1800 and --clients within 1-500")
    pubsub = PubSubEmulator()
    server: Loopgate | None = None
    try:
        pubsub.start()
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host
        create_topics(pubsub.host, (TOPIC,), subscription=SUBSCRIPTION)
        server = start_loopgate(
            {
                "LOOPGATE_AUTH": "disabled",
                "LOOPGATE_SUBSCRIPTIONS": SUBSCRIPTION,
                "PUBSUB_EMULATOR_HOST": pubsub.host,
                **dict(item.split("=", 1) for item in args.env),
            },
            workers=1,
        )
        (worker,) = server.workers()
        before_rss, before_fds = rss_kib(worker), open_fds(worker)
        kinds = tuple(args.kinds.split(","))
        tally, lines = asyncio.run(
            fuzz(server, args.seconds, args.clients, args.seed, kinds, args.routes)
        )
        time.sleep(3)  # the hostile connections' last frames and closes are handled
        alive = server.process.poll() is None and worker in server.workers()
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            subscribers = sum(
                float(line.rsplit(" ", 1)[1])
                for line in response.read().decode().splitlines()
                if line.startswith("loopgate_stream_subscribers{")
            )
        after_rss, after_fds = rss_kib(worker), open_fds(worker)
        peak = int(
            next(
                line.split()[1]
                for line in open(f"/proc/{worker}/status").read().splitlines()
                if line.startswith("VmHWM")
            )
        )
        print(f"server log: {server.log_path}")
        code = server.stop()
    finally:
        if server is not None and server.process.poll() is None:
            server.stop()
        pubsub.stop()
    growth = (after_rss - before_rss) / 1024
    problems = list(tally.violations)
    if not alive:
        problems.append("the worker died")
    if subscribers > 0:
        problems.append(f"{subscribers:g} subscribers still counted after every client left")
    if growth > args.rss_slack:
        problems.append(f"RSS grew {growth:.1f} MiB and stayed")
    print(
        f"project {PROJECT}, {args.clients} hostile clients for {args.seconds:g}s, seed {args.seed}"
    )
    print(f"- connections: {tally.connections}, frames sent: {sum(tally.frames_sent.values())}")
    print(f"- frames by kind: {dict(sorted(tally.frames_sent.items()))}")
    print(f"- replies by type: {dict(sorted(tally.replies.items()))}")
    print(f"- close codes seen: {dict(sorted(tally.closes.items()))}")
    print(
        f"- worker RSS {before_rss / 1024:.1f} -> {after_rss / 1024:.1f} MiB "
        f"(peak {peak / 1024:.1f}), fds {before_fds} -> {after_fds}"
    )
    print("\n".join(lines))
    print(f"- server exit status after SIGTERM: {code}")
    problems += [line for line in lines if line.startswith("- problem")]
    for problem in problems[:20]:
        print(f"FAIL: {problem}")
    print("PASS" if not problems else "FAIL")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
