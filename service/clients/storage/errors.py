"""Cloud Storage failures as the service's errors, keeping the backend's own message.

A missing bucket or object is 404, a failed precondition 412, a bad request 400, a refused
credential 403; an unreachable backend, a timeout, throttling and 5xx answers are 503 with
``Retry-After``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp

from ...errors import (
    BackendError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RangeNotSatisfiable,
    ServiceError,
    Unavailable,
)

BACKEND = "storage"
RETRY_AFTER = 1.0


def backend_message(body: str) -> str:
    """The ``error.message`` of a Google JSON error body, else the body itself (trimmed)."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        message = data["error"].get("message")
        if message:
            return str(message)
    return body.strip()[:500]


def from_status(status: int, message: str, bucket: str | None, name: str | None) -> ServiceError:
    """The service error for a backend answer with ``status``."""
    where = f"{bucket}/{name}" if name else str(bucket)
    if status == 404:
        # The emulator answers a missing object and a missing bucket alike, with an empty body.
        resource = name if name and "bucket" not in message.lower() else str(bucket)
        fallback = (
            f"object {name!r} not found in bucket {bucket!r}"
            if resource == name
            else f"bucket {bucket!r} not found"
        )
        text = message if message and message.lower() not in ("not found", "") else fallback
        return NotFound(text, resource=resource)
    detail = message or f"HTTP {status} for {where}"
    if status == 412:
        return PreconditionFailed(detail)
    if status == 416:
        return RangeNotSatisfiable(detail, size=0)
    if status in (401, 403):
        return PermissionDenied(f"{BACKEND}: {detail}")
    if status == 400:
        return InvalidArgument(detail)
    return BackendError(BACKEND, detail, retry_after=RETRY_AFTER)


@contextmanager
def translate(bucket: str | None, name: str | None) -> Iterator[None]:
    """Raise the service error for a backend failure inside the block."""
    try:
        yield
    except aiohttp.ClientResponseError as exc:
        _, _, body = (exc.message or "").partition(": ")
        message = backend_message(body) if body else ""
        raise from_status(exc.status, message, bucket, name) from exc
    except aiohttp.ConnectionTimeoutError as exc:
        raise Unavailable(
            f"{BACKEND}: no connection to the backend in time: every connection of this server "
            "may be in use by other transfers, or the backend is not accepting connections",
            retry_after=RETRY_AFTER,
        ) from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        detail = str(exc) or type(exc).__name__
        raise Unavailable(
            f"{BACKEND}: the backend is unreachable: {detail}", retry_after=RETRY_AFTER
        ) from exc


async def raise_for_status(response: aiohttp.ClientResponse) -> None:
    """Raise ``aiohttp.ClientResponseError`` carrying the body, as gcloud-aio does."""
    if response.status >= 400:
        body = await response.text(errors="replace")
        raise aiohttp.ClientResponseError(
            response.request_info,
            response.history,
            status=response.status,
            message=f"{response.reason}: {body}",
            headers=response.headers,
        )


class BodyError:
    """Remembers an error raised by a request body while aiohttp was sending it.

    aiohttp reports a failing payload as a connection error of its own; the body's error (a client
    disconnect, a body over the limit) is what the caller must see.
    """

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.error: BaseException | None = None

    @classmethod
    def watch(cls, chunks: AsyncIterator[bytes]) -> BodyError:
        return cls(chunks)

    async def iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._chunks:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise

    @contextmanager
    def reraise(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            if self.error is not None and exc is not self.error:
                raise self.error from None
            raise
