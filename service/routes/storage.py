"""Cloud Storage objects: streamed uploads and downloads, listing and deletion.

* ``PUT /v1/buckets/{bucket}/objects/{name}``: the body becomes the object (``Content-Type`` kept);
  201 with its metadata. ``If-None-Match: *`` creates only when absent (412 otherwise).
* ``GET`` on the same path streams the object, honouring ``Range`` and ``If-Range`` (206; see
  :mod:`.storage_download`) and ``If-None-Match`` (304); ``HEAD`` answers the headers only;
  ``DELETE`` answers 204.
* ``GET /v1/buckets/{bucket}/objects?prefix=&delimiter=&pageToken=&maxResults=``: a page of
  metadata.

Bodies stream through in chunks both ways, so memory stays flat whatever the object's size; see
:mod:`service.server.request_body` for how uploads are read with back-pressure.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, jsonify, request
from quart.blueprints import BlueprintSetupState
from quart_schema import document_response
from werkzeug.http import quote_etag
from werkzeug.routing import PathConverter

from .. import metrics
from ..auth.access import requires
from ..clients import get_storage
from ..clients.storage.client import object_metadata
from ..clients.storage.names import (
    MAX_PAGE_SIZE,
    check_bucket,
    check_name,
    check_query,
    decode_token,
    page,
)
from ..config import current_settings
from ..errors import (
    BodyStalled,
    ClientDisconnected,
    ErrorResponse,
    InvalidArgument,
    PayloadTooLarge,
    PreconditionFailed,
    RequestTimeout,
)
from ..server import request_body
from .storage_download import (
    COUNT_BYTES,
    check_generation,
    metadata_headers,
    open_body,
    requested_range,
    streamed,
    whole_object,
)

log = logging.getLogger("loopgate.storage")

blueprint = Blueprint("storage", __name__)
OBJECT = "/v1/buckets/<bucket>/objects/<object:name>"
# The metrics' children for uploads, looked up once: ``labels()`` takes a lock and a lookup.
_BYTES_UP = metrics.STORAGE_BYTES.labels(direction="up")
_UPLOADS = metrics.STORAGE_TRANSFERS.labels(direction="up")


class ObjectNameConverter(PathConverter):
    """A ``path`` converter that also takes names starting with ``/``."""

    regex = r"[\s\S]+?"
    part_isolating = False


@blueprint.record_once
def _setup(state: BlueprintSetupState) -> None:
    state.app.url_map.converters["object"] = ObjectNameConverter


# -- upload -------------------------------------------------------------------------------------


async def _request_chunks(limit: int) -> AsyncIterator[bytes]:
    stream = request_body.request_stream()
    idle = current_settings().upload_idle_timeout
    source = stream.chunks(idle) if stream is not None else request.body
    counter = _BYTES_UP
    accepted = counted = 0
    try:
        async for chunk in source:
            if accepted + len(chunk) > limit:
                raise PayloadTooLarge(f"object larger than {limit} bytes")
            accepted += len(chunk)
            if accepted - counted >= COUNT_BYTES:
                counter.inc(accepted - counted)
                counted = accepted
            yield chunk
    finally:
        counter.inc(accepted - counted)


@blueprint.put(OBJECT, merge_slashes=False)
@requires("storage:write", "bucket")
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 411)
@document_response(ErrorResponse, 412)
@document_response(ErrorResponse, 413)
@document_response(ErrorResponse, 503)
@request_body.streams_body
async def put_object(bucket: str, name: str) -> Response:
    """Create or replace an object from the request body."""
    check_bucket(bucket)
    check_name(name, request.scope.get("raw_path"))
    settings = current_settings()
    length = request.content_length
    if length is not None and length > settings.max_object_bytes:
        raise PayloadTooLarge(
            f"object of {length} bytes is larger than the limit of {settings.max_object_bytes}"
        )
    condition = request.if_none_match
    if condition and not condition.star_tag:
        raise InvalidArgument("only 'If-None-Match: *' is supported on uploads")
    if_absent = bool(condition.star_tag)
    content_type = request.headers.get("Content-Type") or "application/octet-stream"
    client = await get_storage()
    # Checked before the body is read: the emulator ignores the precondition that the upload
    # carries, and a large body need not travel to fail at the end.
    if if_absent and await client.exists(bucket, name):
        raise PreconditionFailed(f"object {name!r} already exists in bucket {bucket!r}")
    chunks = _request_chunks(settings.max_object_bytes)
    _UPLOADS.inc()
    try:
        if length is not None and length <= settings.storage_chunk_bytes:
            resource = await client.upload_small(
                bucket, name, chunks, size=length, content_type=content_type, if_absent=if_absent
            )
        else:
            resource = await client.upload_stream(
                bucket, name, chunks, size=length, content_type=content_type, if_absent=if_absent
            )
    except ClientDisconnected:
        log.info("upload of %s/%s abandoned: the client disconnected", bucket, name)
        raise
    except BodyStalled as exc:
        log.info("upload of %s/%s abandoned: %s", bucket, name, exc)
        raise RequestTimeout(f"upload abandoned: {exc.message}") from exc
    finally:
        _UPLOADS.dec()
    metadata = object_metadata(resource)
    # A ready response: quart-schema would otherwise build a pydantic TypeAdapter for the body
    # and for the headers on every request.
    response = jsonify(metadata)
    response.status_code = 201
    if metadata.get("etag"):
        response.headers["ETag"] = quote_etag(str(metadata["etag"]))
    return response


# -- download -------------------------------------------------------------------------------------


@blueprint.get(OBJECT, merge_slashes=False)
@requires("storage:read", "bucket")
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 416)
@document_response(ErrorResponse, 503)
async def get_object(bucket: str, name: str) -> Response:
    """Stream an object (or, for ``HEAD``, its headers)."""
    check_bucket(bucket)
    check_name(name, request.scope.get("raw_path"))
    client = await get_storage()
    if request.method == "GET" and "Range" not in request.headers and not request.if_none_match:
        return await whole_object(client, bucket, name)
    # A conditional or ranged read, or HEAD: the object's metadata decides the answer.
    headers, etag, size = metadata_headers(await client.metadata(bucket, name))
    if request.if_none_match and request.if_none_match.contains_weak(etag):
        return Response(b"", 304, headers)
    status, byte_range = 200, None
    if request.method == "GET":  # a Range on HEAD is ignored (RFC 9110 section 14.2)
        range_header, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        byte_range = requested_range(range_header, if_range, headers["ETag"], size)
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {byte_range[0]}-{byte_range[1]}/{size}"
    length = byte_range[1] - byte_range[0] + 1 if byte_range else size
    if request.method == "HEAD" or length == 0:
        response = Response(b"", status, headers)
        response.content_length = length
        return response
    body = await open_body(client, bucket, name, byte_range)
    await check_generation(body, headers["X-Goog-Generation"], name)
    return streamed(body, status, headers, length)


# -- delete and list --------------------------------------------------------------------------


@blueprint.delete(OBJECT, merge_slashes=False)
@requires("storage:write", "bucket")
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 503)
async def delete_object(bucket: str, name: str) -> tuple[str, int]:
    """Delete an object: 204, or 404 when it does not exist."""
    check_bucket(bucket)
    check_name(name, request.scope.get("raw_path"))
    client = await get_storage()
    await client.delete(bucket, name)
    return "", 204


def _page_size() -> int:
    raw = request.args.get("maxResults", str(MAX_PAGE_SIZE))
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"maxResults must be an integer from 1 to {MAX_PAGE_SIZE}")
    return size


@blueprint.get("/v1/buckets/<bucket>/objects")
@requires("storage:read", "bucket")
@document_response(ErrorResponse, 400)
@document_response(ErrorResponse, 404)
@document_response(ErrorResponse, 503)
async def list_objects(bucket: str) -> dict[str, Any]:
    """A page of object metadata (and, with a delimiter, of common prefixes) in name order."""
    check_bucket(bucket)
    check_query(request.query_string)
    prefix = request.args.get("prefix", "")
    delimiter = request.args.get("delimiter", "")
    size = _page_size()
    token = request.args.get("pageToken")
    start, skip = decode_token(token) if token else (prefix, None)
    start = max(start, prefix)
    params = {"maxResults": str(size + 1)}
    for key, value in (("prefix", prefix), ("delimiter", delimiter), ("startOffset", start)):
        if value:
            params[key] = value
    client = await get_storage()
    data = await client.list(bucket, params)
    items = [object_metadata(item) for item in data.get("items") or []]
    kept, prefixes, next_token = page(
        items,
        list(data.get("prefixes") or []),
        start=start,
        skip=skip,
        size=size,
        more=bool(data.get("nextPageToken")),
    )
    body: dict[str, Any] = {"items": kept, "prefixes": prefixes}
    if next_token:
        body["nextPageToken"] = next_token
    return body
