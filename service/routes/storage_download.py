"""Object downloads: the backend's media response streamed to the client.

A plain read is served from the media response alone (one backend request); conditional and
ranged reads first fetch the object's metadata, which decides the status and headers.

Ranges follow RFC 9110 section 14 (:func:`requested_range`). A ``GET`` with one byte range
answers 206 with that range: ``first-last`` (``last`` past the end is cut to the end),
``first-``, and ``-suffix`` (the last ``suffix`` bytes, or the whole object when it is
shorter); a ``first`` at or past the end, or a suffix of 0, answers 416 with
``Content-Range: bytes */SIZE``. The ``Range`` header is ignored, and the whole object sent
with 200, when it does not parse, names another unit than ``bytes``, asks for several ranges
(no multipart responses, and no single range covering them: a client asking for several must
take a 200 anyway), comes with an ``If-Range`` that does not match the object's ETag (strong
comparison; no ``Last-Modified`` is sent, so an ``If-Range`` date never matches), or comes on
a ``HEAD`` (Range is defined for ``GET`` only). An empty object is always answered with 200:
no 206 can describe its zero bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from quart import Response
from werkzeug.http import parse_range_header, quote_etag

from .. import metrics
from ..clients.storage.client import StorageClient
from ..clients.storage.media import media_info
from ..config import current_settings
from ..errors import RangeNotSatisfiable, Unavailable

log = logging.getLogger("loopgate.storage")

READ_BYTES = 256 * 1024
# Transferred bytes are counted in steps of this size, and at a transfer's end: a metric update
# (in multiprocess mode, a locked write to a shared file) costs a noticeable part of a chunk's
# time, and at 1 MiB steps still about 3% of a worker's CPU per downloaded byte.
COUNT_BYTES = 8 * 1024 * 1024
# The metrics' children for downloads, looked up once: ``labels()`` takes a lock and a lookup.
_BYTES_DOWN = metrics.STORAGE_BYTES.labels(direction="down")
_DOWNLOADS = metrics.STORAGE_TRANSFERS.labels(direction="down")
# A suffix range of length 0: valid syntax that selects nothing (werkzeug calls it malformed).
EMPTY_SUFFIX = re.compile(r"[ \t]*-0+[ \t]*", re.ASCII)


class DownloadBody:
    """A response body read from the backend's open response, chunk by chunk.

    Closing it (Quart does when the response ends, is cancelled or never starts) releases the
    backend connection, so a client that goes away leaves nothing open. A client that stays but
    takes nothing for ``idle_timeout`` seconds (its receive window shut, the send of a chunk never
    finishing) has its response ended: the task sending it is cancelled, which closes the body. A
    backend that sends nothing for ``read_timeout`` seconds has its response closed: the read
    waiting for it raises, which ends the download as a failed read does.
    """

    def __init__(
        self,
        context: AbstractAsyncContextManager[aiohttp.ClientResponse],
        response: aiohttp.ClientResponse,
        *,
        idle_timeout: float,
        read_timeout: float,
        description: str,
    ) -> None:
        self._context = context
        self._response = response
        self._content = response.content
        self._closed = False
        self._sent = self._counted = 0
        self._counter = _BYTES_DOWN
        self._idle_timeout = idle_timeout
        self._read_timeout = read_timeout
        self._description = description
        self._sender: asyncio.Task[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        # How often the watchdog looks at most: a stall is seen within a quarter of its limit.
        self._tick = min(idle_timeout, read_timeout) / 4
        # The loop time the read under way began, or the chunk being sent was handed on.
        self._since = 0.0
        self._sending = False
        _DOWNLOADS.inc()

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The backend response's headers."""
        return self._response.headers

    def __aiter__(self) -> DownloadBody:
        return self

    async def __anext__(self) -> bytes:
        # Asked for the next chunk: the previous one has been handed to the client.
        self._sending = False
        self._since = self._loop.time()
        if self._closed:
            raise StopAsyncIteration
        if self._watchdog is None:
            self._sender = asyncio.current_task()
            self._watchdog = self._loop.call_at(self._since + self._tick, self._check)
        try:
            chunk = await self._content.read(READ_BYTES)
        except BaseException:
            await self.aclose()
            raise
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        self._sent += len(chunk)
        if self._sent - self._counted >= COUNT_BYTES:
            self._count()
        self._sending = True
        self._since = self._loop.time()
        return chunk

    def _check(self) -> None:
        """The watchdog: one timer for the whole body, set again for as long as reads and sends
        finish in time (cheaper than a timer of its own for every chunk, or every piece the
        socket hands on, as aiohttp's read timeout sets)."""
        if self._closed:
            self._watchdog = None
            return
        limit = self._idle_timeout if self._sending else self._read_timeout
        deadline = self._since + limit
        now = self._loop.time()
        if now < deadline:
            # Looked at again by then, or sooner: the body may switch from reading to sending, to
            # a shorter limit, before that deadline, and no chunk sets a timer of its own.
            self._watchdog = self._loop.call_at(min(deadline, now + self._tick), self._check)
            return
        self._watchdog = None
        if self._sending:
            log.info(
                "download of %s abandoned: the client took nothing for %g s",
                self._description,
                limit,
            )
            if self._sender is not None:
                self._sender.cancel()
        else:
            log.info(
                "download of %s abandoned: the backend sent nothing for %g s",
                self._description,
                limit,
            )
            self._response.close()  # the read waiting for it raises ClientConnectionError

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _count(self) -> None:
        self._counter.inc(self._sent - self._counted)
        self._counted = self._sent

    async def aclose(self) -> None:
        self._disarm()
        if not self._closed:
            self._closed = True
            self._count()
            _DOWNLOADS.dec()
            await self._context.__aexit__(None, None, None)


def metadata_headers(meta: dict[str, Any]) -> tuple[dict[str, str], str, int]:
    """The response headers, ETag and size of an object's metadata."""
    generation = str(meta.get("generation", ""))
    etag = str(meta.get("etag") or meta.get("md5Hash") or generation)
    headers = {
        "ETag": quote_etag(etag),
        "Accept-Ranges": "bytes",
        "Content-Type": meta.get("contentType") or "application/octet-stream",
        "X-Goog-Generation": generation,
    }
    return headers, etag, int(meta.get("size") or 0)


def streamed(body: DownloadBody, status: int, headers: dict[str, str], length: int) -> Response:
    """The response streaming ``body`` (``length`` bytes)."""
    headers["Content-Length"] = str(length)
    response = Response(body, status, headers)
    response.timeout = None  # a large object may take longer than Quart's response timeout
    return response


async def open_body(
    client: StorageClient, bucket: str, name: str, byte_range: tuple[int, int] | None = None
) -> DownloadBody:
    """The object's media (``byte_range`` inclusive), open and unread."""
    context = client.download(bucket, name, byte_range)
    response = await context.__aenter__()
    return DownloadBody(
        context,
        response,
        idle_timeout=current_settings().download_idle_timeout,
        read_timeout=client.read_timeout,
        description=f"{bucket}/{name}",
    )


async def check_generation(body: DownloadBody, generation: str, name: str) -> None:
    """Refuse (503, to be retried) a body of another generation than the metadata described."""
    served = body.headers.get("x-goog-generation")
    if served and served != generation:
        await body.aclose()
        raise Unavailable(f"object {name!r} changed while being read; try again", retry_after=0)


async def whole_object(client: StorageClient, bucket: str, name: str) -> Response:
    """A plain read: one backend request, described by the media response's own headers."""
    body = await open_body(client, bucket, name)
    info = media_info(body.headers)
    if info is None:  # the backend did not say enough: ask for the metadata too
        try:
            headers, _, size = metadata_headers(await client.metadata(bucket, name))
        except BaseException:
            await body.aclose()
            raise
        await check_generation(body, headers["X-Goog-Generation"], name)
        return streamed(body, 200, headers, size)
    headers = {
        "ETag": quote_etag(info.etag),
        "Accept-Ranges": "bytes",
        "Content-Type": info.content_type,
    }
    if info.generation:
        headers["X-Goog-Generation"] = info.generation
    return streamed(body, 200, headers, info.size)


def requested_range(
    range_header: str | None, if_range: str | None, etag: str, size: int
) -> tuple[int, int] | None:
    """The inclusive byte range a ``GET`` asks for, or ``None`` for the whole object.

    Arguments:
        range_header, if_range: the request's ``Range`` and ``If-Range`` headers.
        etag: the object's ETag as sent in the ``ETag`` header (quoted).
        size: the object's size in bytes.

    Raises:
        RangeNotSatisfiable: the one range asked for lies past the object's end.
    """
    if not range_header or not size:
        return None
    if if_range is not None and if_range.strip(" \t") != etag:
        return None  # a changed object (or a weak tag, or a date): the whole of it is sent
    unit, _, ranges = range_header.partition("=")
    # Empty list elements ("bytes=0-9,") are ignored, as RFC 9110 section 5.6.1.2 asks.
    ranges = ",".join(part for part in ranges.split(",") if part.strip(" \t"))
    is_bytes = unit.strip(" \t").lower() == "bytes"
    if is_bytes and EMPTY_SUFFIX.fullmatch(ranges):
        raise RangeNotSatisfiable(
            f"range {range_header} selects none of the {size} bytes", size=size
        )
    wanted = parse_range_header(f"{unit}={ranges}")
    if wanted is None or wanted.units != "bytes" or len(wanted.ranges) != 1:
        return None
    start, stop = wanted.ranges[0]  # ``stop`` is exclusive, ``None`` when open
    if start < 0:  # the last ``-start`` bytes
        return max(size + start, 0), size - 1
    if start >= size:
        raise RangeNotSatisfiable(f"range {range_header} is outside the {size} bytes", size=size)
    return start, (size if stop is None else min(stop, size)) - 1
