"""Cloud Storage: one gcloud-aio-storage ``Storage`` per event loop, over the loop's session.

The client is built on the loop's shared ``aiohttp.ClientSession`` (the ``http`` client).
gcloud-aio never closes a session it was handed; the registry closes the ``http`` client once,
after this one.
``STORAGE_EMULATOR_HOST`` (``http://host:port``) points it at an emulator and drops authentication.

What gcloud-aio-storage does here, and what it cannot:

* metadata, listing and deletion go through its public calls;
* downloads stream through its ``download_stream``, which hands back the open response; the
  media response's own headers (:mod:`.storage_media`) describe the object well enough to serve a
  plain read, so the object's metadata is fetched only when a read needs more;
* uploads do not go through it: ``Storage.upload`` takes bytes or a seekable file object (it
  measures the length by seeking and sends the whole stream in one call), so an upload could not
  be fed from a request body as it arrives, and even a small one would be copied into one buffer
  first. Uploads therefore use the loop's session directly. A body of known length up to
  ``storage_chunk_bytes`` is forwarded as it arrives in one simple upload
  (:meth:`StorageClient.upload_small`; Cloud Storage makes no object of a request whose body
  ends early); a larger one runs a resumable upload
  (:meth:`StorageClient.upload_stream`): the body's chunks are forwarded as they arrive, and the
  object exists only once the last byte is in. An upload cut short leaves an unfinished upload
  session, never an object; Cloud Storage discards such sessions after a week.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import quote

import aiohttp
from gcloud.aio.auth import Token
from gcloud.aio.storage import Storage

from ...config import Settings, current_settings
from ...errors import NotFound
from ...loopclients import ClientSpec
from ..http_session import HTTP
from .errors import BodyError, raise_for_status, translate

SCOPES = ["https://www.googleapis.com/auth/devstorage.read_write"]
DEFAULT_API_ROOT = "https://storage.googleapis.com"
# Fields of an object's metadata that loopgate answers.
METADATA_FIELDS = (
    "bucket",
    "name",
    "size",
    "contentType",
    "md5Hash",
    "crc32c",
    "etag",
    "generation",
    "metageneration",
    "timeCreated",
    "updated",
)


def object_metadata(resource: dict[str, Any]) -> dict[str, Any]:
    """The public part of an object resource."""
    return {key: resource[key] for key in METADATA_FIELDS if resource.get(key) is not None}


class StorageClient:
    """Cloud Storage calls of one event loop."""

    def __init__(
        self,
        storage: Storage,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        api_root: str,
        emulator: bool,
    ) -> None:
        self.storage = storage
        self.session = session
        self.api_root = api_root.rstrip("/")
        self.emulator = emulator
        self.chunk_bytes = settings.storage_chunk_bytes
        # ``connect`` bounds the wait for a free connection of the session's pool as well as
        # the connection itself: with every connection held by transfers in progress, a call
        # answers 503 rather than waiting for as long as they last.
        connect = settings.storage_connect_timeout
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=settings.storage_timeout
        )
        # gcloud-aio types its timeouts as int but hands a ClientTimeout through unchanged.
        self._aio_timeout = cast(int, self.timeout)
        # A download's head must come within ``read_timeout``, and its body is watched by its
        # reader (``service.routes.storage_download.DownloadBody``): aiohttp's own ``sock_read``
        # sets a new timer for every piece of a body the socket hands on (hundreds for a 50 MB
        # object), a few percent of the worker's CPU per downloaded byte.
        self.read_timeout = settings.storage_timeout
        self._download_timeout = cast(
            int, aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect)
        )

    async def auth_headers(self) -> dict[str, str]:
        """The headers that authorize a request of this client's own (none on the emulator)."""
        if self.emulator:
            return {}
        return {"Authorization": f"Bearer {await self.storage.token.get()}"}

    # -- gcloud-aio-storage calls ---------------------------------------------------------------

    async def metadata(self, bucket: str, name: str) -> dict[str, Any]:
        """The object's resource.

        Raises:
            NotFound, BackendError, Unavailable: as :func:`translate` maps them.
        """
        with translate(bucket, name):
            return await self.storage.download_metadata(bucket, name, timeout=self._aio_timeout)

    async def exists(self, bucket: str, name: str) -> bool:
        """Whether the object exists (a missing bucket raises)."""
        try:
            await self.metadata(bucket, name)
        except NotFound as exc:
            if exc.resource == name:
                return False
            raise
        return True

    async def list(self, bucket: str, params: dict[str, str]) -> dict[str, Any]:
        """One backend page of ``bucket``'s objects."""
        with translate(bucket, None):
            return await self.storage.list_objects(bucket, params=params, timeout=self._aio_timeout)

    async def delete(self, bucket: str, name: str) -> None:
        with translate(bucket, name):
            await self.storage.delete(bucket, name, timeout=self._aio_timeout)

    async def upload_small(
        self,
        bucket: str,
        name: str,
        chunks: AsyncIterator[bytes],
        *,
        size: int,
        content_type: str,
        if_absent: bool,
    ) -> dict[str, Any]:
        """Upload a body of a known, small ``size`` in one request (a simple, ``uploadType=media``
        upload), forwarding each chunk as it arrives: no second request to open a session, and
        nothing held back until the whole body is in. Errors raised by ``chunks`` abort the
        upload and are raised as they are.
        """
        url = f"{self.api_root}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        params = {"uploadType": "media", "name": name}
        if if_absent:
            params["ifGenerationMatch"] = "0"
        headers = await self.auth_headers()
        headers["Content-Type"] = content_type
        headers["Content-Length"] = str(size)
        body = BodyError.watch(chunks)
        with translate(bucket, name), body.reraise():
            async with self.session.post(
                url, params=params, headers=headers, data=body.iterate(), timeout=self.timeout
            ) as response:
                await raise_for_status(response)
                return cast(dict[str, Any], await response.json(content_type=None))

    @asynccontextmanager
    async def download(
        self, bucket: str, name: str, byte_range: tuple[int, int] | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The open media response of the object (``byte_range`` is inclusive); the connection is
        dropped when the body is left unread.

        Its head must come within ``read_timeout``; its body has no read timeout of its own: the
        caller bounds each read (``DownloadBody`` does).
        """
        headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
        deadline = asyncio.timeout(self.read_timeout)
        with translate(bucket, name):
            try:
                async with deadline:
                    stream = await self.storage.download_stream(
                        bucket, name, headers=headers, timeout=self._download_timeout
                    )
            except TimeoutError as exc:
                if not deadline.expired():  # aiohttp's connect timeout: translated as such
                    raise
                raise aiohttp.SocketTimeoutError(
                    f"no answer within {self.read_timeout:g} s"
                ) from exc
        response: aiohttp.ClientResponse = await stream.__aenter__()
        try:
            yield response
        finally:
            if not response.content.at_eof():
                response.close()
            await stream.__aexit__(None, None, None)

    # -- resumable upload over the session --------------------------------------------------------

    async def upload_stream(
        self,
        bucket: str,
        name: str,
        chunks: AsyncIterator[bytes],
        *,
        size: int | None,
        content_type: str,
        if_absent: bool,
    ) -> dict[str, Any]:
        """Upload ``chunks`` with a resumable upload, forwarding each chunk as it arrives.

        With a known ``size`` the body goes in one streamed request; otherwise in pieces of
        ``storage_chunk_bytes``, each buffered once. Errors raised by ``chunks`` (a client
        disconnect, a body over the limit) abort the upload and are raised as they are.
        """
        session_uri = await self._start_resumable(bucket, name, size, content_type, if_absent)
        body = BodyError.watch(chunks)
        with translate(bucket, name), body.reraise():
            if size is not None:
                return await self._put(session_uri, body.iterate(), 0, size, size)
            return await self._put_pieces(session_uri, body.iterate())

    async def _start_resumable(
        self, bucket: str, name: str, size: int | None, content_type: str, if_absent: bool
    ) -> str:
        url = f"{self.api_root}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        params = {"uploadType": "resumable"}
        if if_absent:
            params["ifGenerationMatch"] = "0"
        headers = await self.auth_headers()
        headers["Content-Type"] = "application/json; charset=UTF-8"
        headers["X-Upload-Content-Type"] = content_type
        if size is not None:
            headers["X-Upload-Content-Length"] = str(size)
        metadata = json.dumps({"name": name, "contentType": content_type})
        with translate(bucket, name):
            async with self.session.post(
                url, params=params, headers=headers, data=metadata, timeout=self.timeout
            ) as response:
                await raise_for_status(response)
                return response.headers["Location"]

    async def _put(
        self, session_uri: str, data: Any, start: int, length: int, total: int | None
    ) -> dict[str, Any]:
        """Send ``length`` bytes at ``start``; the object's resource once ``total`` is reached,
        ``{}`` while the upload is incomplete."""
        headers = await self.auth_headers()
        end = "*" if total is None else str(total)
        headers["Content-Length"] = str(length)
        headers["Content-Range"] = (
            f"bytes {start}-{start + length - 1}/{end}" if length else f"bytes */{end}"
        )
        async with self.session.put(
            session_uri, data=data, headers=headers, timeout=self.timeout
        ) as response:
            if response.status == 308:  # the backend's "resume incomplete"
                return {}
            await raise_for_status(response)
            return cast(dict[str, Any], await response.json(content_type=None))

    async def _put_pieces(self, session_uri: str, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        piece = bytearray()
        sent = 0
        async for chunk in chunks:
            piece += chunk
            while len(piece) >= self.chunk_bytes:
                data = io.BytesIO(piece[: self.chunk_bytes])
                await self._put(session_uri, data, sent, self.chunk_bytes, None)
                sent += self.chunk_bytes
                del piece[: self.chunk_bytes]
        total = sent + len(piece)
        return await self._put(session_uri, io.BytesIO(piece), sent, len(piece), total)

    async def check(self, buckets: tuple[str, ...], project: str, *, timeout: float) -> None:
        """Readiness: the first allowed bucket answers (or, with '*' alone, the bucket list).

        Every wait of the call (a free connection of the pool, the connection, each read) is bounded
        by ``timeout``, so a backend that accepts connections but does not answer is noticed.

        Raises:
            Unavailable: no connection or no answer in time (as :func:`translate` maps them).
        """
        named = [bucket for bucket in buckets if bucket != "*"]
        bounded = aiohttp.ClientTimeout(
            total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
        )
        with translate(named[0] if named else None, None):
            if named:
                await self.storage.get_bucket_metadata(named[0], timeout=cast(int, bounded))
            elif buckets:
                await self.storage.list_buckets(
                    project, params={"maxResults": "1"}, timeout=cast(int, bounded)
                )


async def create_storage() -> StorageClient:
    settings = current_settings()
    session = await HTTP.get()
    # gcloud-aio's annotations name its sync build's session type; the aiohttp one is right here.
    shared: Any = session
    host = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
    if host:
        api_root = host if host.startswith(("http://", "https://")) else f"http://{host}"
        storage = Storage(session=shared, api_root=api_root, api_is_dev=True, token=None)
        return StorageClient(storage, session, settings, api_root=api_root, emulator=True)
    token = Token(session=shared, scopes=SCOPES)
    storage = Storage(session=shared, token=token, api_root=DEFAULT_API_ROOT, api_is_dev=False)
    return StorageClient(storage, session, settings, api_root=DEFAULT_API_ROOT, emulator=False)


async def close_storage(client: StorageClient) -> None:
    # Closes nothing of the shared session (gcloud-aio leaves a session it was handed open);
    # the registry closes the ``http`` client after this one.
    await client.storage.close()


async def check_storage(client: StorageClient) -> None:
    settings = current_settings()
    await client.check(settings.buckets, settings.project, timeout=settings.ready_timeout)


STORAGE: ClientSpec[StorageClient] = ClientSpec(
    "storage", create=create_storage, close=close_storage, check=check_storage
)

__all__ = ["STORAGE", "StorageClient", "object_metadata"]
