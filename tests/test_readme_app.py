"""The complete Quart app the README opens its pattern section with, run as written."""

from __future__ import annotations

import asyncio
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from conftest import PROJECT, ROOT, Topic

pytestmark = pytest.mark.emulator


def readme_app_source() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- readme-app -->\n```python\n(.*?)\n```", text, re.DOTALL)
    assert match, "the README's pattern section lost its marked app"
    return match.group(1)


def load_readme_app(tmp_path: Path) -> Any:
    path = tmp_path / "readme_app.py"
    path.write_text(readme_app_source())
    spec = importlib.util.spec_from_file_location("readme_app", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_app"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["readme_app"]
    return module


def test_the_readme_app_uses_the_extension_alone() -> None:
    imports = re.findall(r"^(?:from|import) ([\w.]+)", readme_app_source(), re.MULTILINE)
    assert "service.loopclients" in imports
    assert [
        name for name in imports if name.startswith("service") and name != "service.loopclients"
    ] == []


async def test_the_readme_app_publishes_and_fetches_with_one_client_per_loop(
    tmp_path: Path, topic: Topic, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROJECT", PROJECT)
    module = load_readme_app(tmp_path)

    async def hundred_bytes(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 100)

    upstream = web.Application()
    upstream.router.add_get("/", hundred_bytes)
    runner = web.AppRunner(upstream)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    created: list[str] = []
    extension = module.app.extensions["loopclients"]
    real_creates = {spec.name: spec.create for spec in extension.specs}
    try:
        async with module.app.test_app():
            client = module.app.test_client()
            registry = extension.registry_for_running_loop()
            created = registry.created()
            name = topic.name.rsplit("/", 1)[-1]
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(client.post(f"/topics/{name}", data=f"m{i}".encode()) for i in range(20))
                ),
                timeout=30,
            )
            assert [answer.status_code for answer in answers] == [200] * 20
            fetched = await client.get(f"/fetch?url=http://127.0.0.1:{port}/")
            assert await fetched.get_json() == {"status": 200, "bytes": 100}
            assert registry.created() == created  # nothing made twice
    finally:
        await runner.cleanup()
    assert sorted(created) == sorted(real_creates) == ["http", "publisher"]
    received = await asyncio.to_thread(topic.received, 20)
    assert sorted(message.data for message in received) == sorted(
        f"m{i}".encode() for i in range(20)
    )
