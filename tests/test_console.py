"""The live console (/console) in headless Chromium, against real servers and the emulator: it
subscribes, shows what is published from the page and from outside, tells a refused token or
topic, survives a restart of the server without a gap, and works under its own strict
Content-Security-Policy. Browser websockets from another origin are refused.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright; no browser is downloaded.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from authkit import bearer, new_token, write_tokens
from conftest import WAIT, PubSubAdmin, Server, make_settings, spawn_server, wait_until_up
from playwright.async_api import Browser, Page, async_playwright, expect

from devtools.emulators import free_port
from service import create_app

pytestmark = pytest.mark.server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = new_token()  # scope *
OUTSIDER = new_token()  # may publish to one other topic only
MS = WAIT * 1000  # Playwright's timeouts are in milliseconds
TOKEN_KEY = "loopgate.console.token"
expect.set_options(timeout=MS)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's chromium: these tests fail, never skip, without it."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium: apt-get install -y chromium",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A page, with what would break the console's promises: policy violations, reported both by
    the document's ``securitypolicyviolation`` events and by the browser's console, and uncaught
    errors."""

    page: Page
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def violations(self) -> list[str]:
        events: list[str] = await self.page.evaluate("window.__cspViolations || []")
        return events + [text for text in self.console if "Content Security Policy" in text]

    async def check(self) -> None:
        assert not await self.violations()
        assert not self.errors


# Recorded from the first script of every document, before the page's own.
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
});
"""


@pytest.fixture
async def watched(browser: Browser) -> AsyncIterator[Watched]:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    page = await context.new_page()
    page.set_default_timeout(MS)
    watched = Watched(page)
    page.on("console", lambda message: watched.console.append(message.text))
    page.on("pageerror", lambda error: watched.errors.append(str(error)))
    await page.add_init_script(RECORD_VIOLATIONS)
    try:
        yield watched
    finally:
        await context.close()


Launch = Callable[..., Awaitable[Server]]


@pytest.fixture
def launch(tmp_path: Path, pubsub_emulator: Any) -> Iterator[Launch]:
    """Start a server with authentication on; by default its own origin may open websockets."""
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {"console": (TOKEN, ["*"]), "outsider": (OUTSIDER, ["publish:elsewhere"])},
    )
    servers: list[Server] = []

    async def start(*, port: int | None = None, origins: str | None = None) -> Server:
        port = port or free_port()
        env = {
            "LOOPGATE_AUTH": "enabled",
            "LOOPGATE_AUTH_FILE": str(tokens),
            "LOOPGATE_ALLOWED_ORIGINS": f"http://127.0.0.1:{port}" if origins is None else origins,
        }
        server = spawn_server(tmp_path, env, port=port)
        servers.append(server)
        await wait_until_up(server)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{server.url}/client/loopgate.js") as response:
                assert response.status == 200, "loopgate.js is not served at /client/loopgate.js"
        return server

    yield start
    for server in servers:
        server.stop()


async def open_console(page: Page, server: Server) -> None:
    response = await page.goto(f"{server.url}/console")
    assert response is not None and response.status == 200
    policy = response.headers["content-security-policy"]
    assert policy == (
        f"default-src 'self'; connect-src 'self' ws://127.0.0.1:{server.port} "
        f"wss://127.0.0.1:{server.port}; script-src 'self'; style-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


async def subscribe_in_page(
    page: Page, topic: str, *, token: str = TOKEN, transport: str = "websocket"
) -> None:
    await page.fill("#token", token)
    await page.fill("#topic", topic)
    await page.select_option("#transport", transport)
    await page.click("#subscribe")


def row(page: Page, message_id: str) -> Any:
    return page.locator(f'#messages tbody tr[data-message-id="{message_id}"]')


async def publish_outside(
    server: Server, topic: str, data: bytes, attributes: dict[str, str] | None = None
) -> str:
    message: dict[str, Any] = {"data": base64.b64encode(data).decode()}
    if attributes:
        message["attributes"] = attributes
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{server.url}/v1/topics/{topic}:publish",
            json={"messages": [message]},
            headers=bearer(TOKEN),
        ) as response:
            assert response.status == 200, await response.text()
            ids: list[str] = (await response.json())["messageIds"]
    return ids[0]


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_the_console_shows_messages_published_from_the_page_and_from_outside(
    launch: Launch, admin: PubSubAdmin, watched: Watched, tmp_path: Path, transport: str
) -> None:
    server = await launch()
    topic = admin.create_topic()
    page = watched.page
    await open_console(page, server)
    await subscribe_in_page(page, topic, transport=transport)
    await expect(page.locator("#state")).to_have_text("open")
    await expect(page.locator("#identity")).to_contain_text('token of "console"')

    await page.fill("#publish-data", "hello from the page ✓")
    await page.fill("#publish-attributes", "source=page\nkind=a=b\n")
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_contain_text("messageId")
    from_page = re.search(r"messageId (\S+)", await page.inner_text("#publish-result"))
    assert from_page is not None
    text_id = await publish_outside(server, topic, b"hello from outside", {"source": "curl"})
    binary_id = await publish_outside(server, topic, b"\xff\x00\x01")

    mine = row(page, from_page[1])
    await expect(mine.locator("td.data")).to_have_text("hello from the page ✓")
    await expect(mine.locator("td.attributes")).to_have_text("kind=a=b\nsource=page")
    await expect(row(page, text_id).locator("td.data")).to_have_text("hello from outside")
    await expect(row(page, text_id).locator("td.attributes")).to_have_text("source=curl")
    await expect(row(page, binary_id).locator("td.data")).to_have_text("3 bytes, base64: /wAB")
    await expect(page.locator("#message-count")).to_have_text("3")
    cells = row(page, text_id).locator("td")
    assert re.fullmatch(r"\d+ ms|\d+\.\d s", await cells.nth(4).inner_text())  # the latency
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", await cells.nth(3).inner_text())
    assert await cells.nth(1).inner_text()  # the cursor

    screenshot = tmp_path / f"console-{transport}.png"
    await page.screenshot(path=screenshot, full_page=True)
    assert screenshot.stat().st_size > 0

    # The token stays in this tab's sessionStorage, and nowhere else.
    stored = await page.evaluate(
        "(key) => [sessionStorage.getItem(key), localStorage.length, document.cookie]", TOKEN_KEY
    )
    assert stored == [TOKEN, 0, ""]
    await page.reload()
    await expect(page.locator("#token")).to_have_value(TOKEN)
    await watched.check()


async def test_the_violation_watch_sees_an_inline_style(launch: Launch, watched: Watched) -> None:
    """The policy holds, and a violation would be seen by the check every test makes."""
    server = await launch()
    page = watched.page
    await open_console(page, server)
    await page.evaluate(
        "document.head.append(Object.assign(document.createElement('style'), "
        "{textContent: 'body { color: red }'}))"
    )
    async with asyncio.timeout(WAIT):
        while not (
            "style-src-elem inline" in await watched.violations()
            and any("Content Security Policy" in text for text in watched.console)
        ):
            await asyncio.sleep(0.05)


async def test_a_bad_token_and_a_forbidden_topic_are_told_clearly(
    launch: Launch, admin: PubSubAdmin, watched: Watched
) -> None:
    server = await launch()
    topic = admin.create_topic()
    page = watched.page
    await open_console(page, server)
    error = page.locator("#error")

    await subscribe_in_page(page, topic, token="lg_not-a-token")
    await expect(error).to_contain_text("The token was refused (401 Unauthorized)")
    await expect(error).to_contain_text("invalid or unknown token")
    await expect(page.locator("#state")).to_have_text("token refused")

    # Refused by the stream itself: the websocket's handshake (which a browser cannot read, so
    # the page asks the same stream over HTTP), and the event stream.
    for transport in ("websocket", "sse"):
        await subscribe_in_page(page, topic, token=OUTSIDER, transport=transport)
        await expect(error).to_contain_text(
            f"Forbidden (403): the token may not use this topic: 'outsider' lacks the scope "
            f"'subscribe:{topic}'"
        )
        await expect(page.locator("#state")).to_have_text("closed: refused")

    await page.fill("#publish-data", "not allowed")
    await page.click("#publish")
    await expect(page.locator("#publish-result")).to_contain_text(
        f"not published: Forbidden (403): the token may not use this topic: 'outsider' lacks "
        f"the scope 'publish:{topic}'"
    )
    await watched.check()


async def test_websockets_from_another_origin_are_refused(
    launch: Launch, admin: PubSubAdmin, watched: Watched, browser: Browser
) -> None:
    server = await launch()
    topic = admin.create_topic()
    stream = f"ws://127.0.0.1:{server.port}/v1/topics/{topic}/stream?access_token={TOKEN}"
    try_websocket = """(url) => new Promise((resolve) => {
        const socket = new WebSocket(url);
        socket.onopen = () => { socket.close(); resolve("open"); };
        socket.onclose = (event) => resolve(`closed ${event.code}`);
    })"""

    # The console's own origin is allowed...
    await open_console(watched.page, server)
    assert await watched.page.evaluate(try_websocket, stream) == "open"
    await watched.check()

    # ... a page of another origin, with the same token, is not.
    async def elsewhere(_: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><p>elsewhere", content_type="text/html")

    other = web.Application()
    other.router.add_get("/", elsewhere)
    runner = web.AppRunner(other)
    await runner.setup()
    other_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", other_port).start()
    try:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{other_port}/")
        assert await page.evaluate(try_websocket, stream) == "closed 1006"
    finally:
        await runner.cleanup()
    assert f"origin 'http://127.0.0.1:{other_port}' is not allowed" in server.log()


async def test_the_console_says_when_its_own_origin_may_not_open_websockets(
    launch: Launch, admin: PubSubAdmin, watched: Watched
) -> None:
    server = await launch(origins="https://app.example.com")
    topic = admin.create_topic()
    page = watched.page
    await open_console(page, server)
    await subscribe_in_page(page, topic)
    await expect(page.locator("#error")).to_contain_text(
        f"The server refuses websockets from this page's origin (http://127.0.0.1:{server.port})"
        ": add it to LOOPGATE_ALLOWED_ORIGINS, or choose Server-Sent Events."
    )
    await subscribe_in_page(page, topic, transport="sse")  # needs no Origin check
    await expect(page.locator("#state")).to_have_text("open")
    await expect(page.locator("#error")).to_be_hidden()
    await watched.check()


@pytest.mark.parametrize("transport", ["websocket", "sse"])
async def test_a_restarted_server_is_followed_without_a_gap(
    launch: Launch, admin: PubSubAdmin, watched: Watched, tmp_path: Path, transport: str
) -> None:
    server = await launch()
    topic = admin.create_topic(retention=3600)
    page = watched.page
    await open_console(page, server)
    await subscribe_in_page(page, topic, transport=transport)
    state = page.locator("#state")
    await expect(state).to_have_text("open")
    before = await publish_outside(server, topic, b"before the restart")
    await expect(row(page, before)).to_have_count(1)

    await asyncio.to_thread(server.stop)
    await expect(state).to_contain_text("reconnecting")
    # Published while no loopgate runs: straight to Pub/Sub.
    topic_path = admin.publisher.topic_path(admin.project, topic)
    futures = [
        admin.publisher.publish(topic_path, f"meanwhile {n}".encode(), n=str(n)) for n in range(3)
    ]
    meanwhile = [await asyncio.to_thread(future.result, WAIT) for future in futures]

    restarted = await launch(port=server.port)
    await expect(state).to_have_text("open, resumed, complete")
    for n, message_id in enumerate(meanwhile):
        await expect(row(page, message_id).locator("td.data")).to_have_text(f"meanwhile {n}")
        await expect(row(page, message_id).locator("td.attributes")).to_have_text(f"n={n}")
    after = await publish_outside(restarted, topic, b"after the restart")
    await expect(row(page, after)).to_have_count(1)
    await expect(row(page, before)).to_have_count(1)  # nothing twice
    await expect(page.locator("#message-count")).to_have_text("5")
    log = await page.inner_text("#status-log")
    assert "reconnecting: attempt" in log and "open, resumed, complete" in log
    await page.screenshot(path=tmp_path / f"console-restart-{transport}.png", full_page=True)
    await watched.check()


async def test_the_console_files_and_its_answers_carry_the_policy(launch: Launch) -> None:
    server = await launch()
    expected_types = {
        "/console": "text/html",
        "/console/app.js": "text/javascript",
        "/console/console.css": "text/css",
        "/console/favicon.svg": "image/svg+xml",
    }
    async with aiohttp.ClientSession() as session:
        for path, content_type in expected_types.items():
            async with session.get(server.url + path) as response:
                assert response.status == 200, path
                assert response.content_type == content_type
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                etag = response.headers["ETag"]
            async with session.get(server.url + path, headers={"If-None-Match": etag}) as again:
                assert again.status == 304
        async with session.get(server.url + "/console/", allow_redirects=False) as response:
            assert response.status == 308
            assert response.headers["Location"] == "../console"
        for path in ("/console/missing.js", "/console/topics"):  # errors carry it too
            async with session.get(server.url + path) as response:
                assert response.status in (401, 404)
                assert response.headers["X-Content-Type-Options"] == "nosniff"
                assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
        async with session.get(
            f"{server.url}/console/topics?origin=http://127.0.0.1:{server.port}",
            headers=bearer(OUTSIDER),
        ) as response:
            assert response.status == 200
            assert json.loads(await response.text()) == {
                "identity": "outsider",
                "anyTopic": True,
                "topics": [{"name": "elsewhere", "subscribe": False, "publish": True}],
                "websocketOrigin": True,
            }


async def test_the_topics_of_a_token_are_those_served_that_it_may_use(
    pubsub_emulator: Any, tmp_path: Path
) -> None:
    tokens = write_tokens(
        tmp_path / "tokens.toml",
        {"reader": (TOKEN, ["subscribe:alpha", "publish:beta-*"]), "none": (OUTSIDER, [])},
    )
    settings = make_settings(
        auth="enabled", auth_file=str(tokens), topics="alpha,beta-1,gamma", allowed_origins=""
    )
    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        response = await client.get("/console/topics?origin=http://x.test", headers=bearer(TOKEN))
        assert response.status_code == 200
        assert await response.get_json() == {
            "identity": "reader",
            "anyTopic": False,
            "topics": [
                {"name": "alpha", "subscribe": True, "publish": False},
                {"name": "beta-1", "subscribe": False, "publish": True},
                {"name": "gamma", "subscribe": False, "publish": False},
            ],
            "websocketOrigin": False,
        }
        response = await client.get("/console/topics", headers=bearer(OUTSIDER))
        assert (await response.get_json())["websocketOrigin"] is None
        response = await client.get("/console/topics", headers=bearer("lg_wrong"))
        assert response.status_code == 401
        assert "invalid or unknown token" in (await response.get_json())["error"]["message"]
