"""The least a proxy on Hypercorn and aiohttp can do for object transfers: the storage peer.

A bare ASGI app, with no framework, authentication, validation, metrics or error mapping, that
moves objects between its clients and ``STORAGE_EMULATOR_HOST`` over one ``aiohttp`` session:

* ``GET /v1/buckets/{bucket}/objects/{name}`` streams gcloud-aio-storage's ``download_stream``;
* ``PUT`` on the same path streams the request body into one simple upload as it arrives.

It measures what the extra hop itself costs (a Hypercorn request in, an aiohttp request out, the
bytes copied through one event loop), so that loopgate's own share of any difference from the
direct transfers can be told apart::

    STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 \
        hypercorn --config hypercorn.toml --workers 1 bench.apps.storage_proxy:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import quote

import aiohttp
from gcloud.aio.storage import Storage

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
READ_BYTES = 256 * 1024


class StorageProxy:
    """The ASGI app; its session is made on the worker's loop at startup."""

    def __init__(self) -> None:
        self.api_root = os.environ["STORAGE_EMULATOR_HOST"].rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.storage: Storage | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            parts = scope["path"].split("/", 5)
            if len(parts) < 6 or parts[1:3] != ["v1", "buckets"] or parts[4] != "objects":
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            bucket, name = parts[3], parts[5]
            if scope["method"] == "GET":
                await self._download(bucket, name, send)
            else:
                length = dict(scope["headers"])[b"content-length"].decode()
                await self._upload(bucket, name, length, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession()
                shared: Any = self.session
                self.storage = Storage(session=shared, api_root=self.api_root, api_is_dev=True)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _download(self, bucket: str, name: str, send: Send) -> None:
        assert self.storage is not None
        async with await self.storage.download_stream(bucket, name) as response:
            headers = [
                (b"content-length", response.headers["Content-Length"].encode()),
                (b"content-type", response.headers["Content-Type"].encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            while chunk := await response.content.read(READ_BYTES):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _upload(
        self, bucket: str, name: str, length: str, receive: Receive, send: Send
    ) -> None:
        assert self.session is not None

        async def body() -> AsyncIterator[bytes]:
            while True:
                message = await receive()
                yield message.get("body", b"")
                if not message.get("more_body"):
                    return

        url = f"{self.api_root}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        params = {"uploadType": "media", "name": name}
        headers = {"Content-Length": length, "Content-Type": "application/octet-stream"}
        async with self.session.post(url, params=params, data=body(), headers=headers) as response:
            status, resource = response.status, await response.read()
        start = {"type": "http.response.start", "status": 201 if status == 200 else status}
        await send({**start, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": resource})


app = StorageProxy()
