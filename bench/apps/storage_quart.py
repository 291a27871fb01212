"""The least a Quart app can do for object transfers: the storage proxy of
``bench/apps/storage_proxy.py`` written as two plain Quart routes.

No authentication, validation, metrics, request ids, error mapping or CORS: the same bytes moved
the same way (gcloud-aio-storage's ``download_stream`` down, one simple upload fed by the request
body as it arrives up), over one ``aiohttp`` session made when serving starts. Next to the bare
ASGI proxy it measures what Quart itself costs per transfer, which no Quart app can avoid; next
to loopgate, what loopgate adds on top of Quart::

    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 \
        hypercorn --config hypercorn.toml --workers 1 bench.apps.storage_quart:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
from gcloud.aio.storage import Storage
from quart import Quart, Response, request

READ_BYTES = 256 * 1024

app = Quart(__name__)
app.config["MAX_CONTENT_LENGTH"] = None  # objects of any size (Quart's default is 16 MiB)
app.config["BODY_TIMEOUT"] = None  # however long a large upload takes
API_ROOT = os.environ["STORAGE_EMULATOR_HOST"].rstrip("/")


@app.before_serving
async def open_session() -> None:
    session: Any = aiohttp.ClientSession()
    app.extensions["session"] = session
    app.extensions["storage"] = Storage(session=session, api_root=API_ROOT, api_is_dev=True)


@app.after_serving
async def close_session() -> None:
    await app.extensions["session"].close()


@app.get("/v1/buckets/<bucket>/objects/<path:name>")
async def download(bucket: str, name: str) -> Response:
    storage: Storage = app.extensions["storage"]
    stream = await storage.download_stream(bucket, name)
    backend = await stream.__aenter__()

    async def body() -> AsyncIterator[bytes]:
        try:
            while chunk := await backend.content.read(READ_BYTES):
                yield chunk
        finally:
            await stream.__aexit__(None, None, None)

    headers = {
        "Content-Length": backend.headers["Content-Length"],
        "Content-Type": backend.headers["Content-Type"],
    }
    response = Response(body(), 200, headers)
    response.timeout = None
    return response


@app.put("/v1/buckets/<bucket>/objects/<path:name>")
async def upload(bucket: str, name: str) -> tuple[bytes, int, dict[str, str]]:
    session: aiohttp.ClientSession = app.extensions["session"]
    url = f"{API_ROOT}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
    params = {"uploadType": "media", "name": name}
    headers = {
        "Content-Length": request.headers["Content-Length"],
        "Content-Type": "application/octet-stream",
    }

    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.body:
            yield chunk

    async with session.post(url, params=params, data=body(), headers=headers) as response:
        status, resource = response.status, await response.read()
    return resource, 201 if status == 200 else status, {"Content-Type": "application/json"}
