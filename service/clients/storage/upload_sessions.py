"""Resumable upload sessions started for a client, who then sends the bytes to Cloud Storage itself.

The session is started with Cloud Storage's JSON API (``uploadType=resumable``) over the loop's
aiohttp session. Its URI is the credential for the upload: whoever holds it can upload the object
(within a week) without any other authentication. The client's ``Origin``, passed on, makes Cloud
Storage answer CORS requests to the session URI for that origin, so a browser can upload to it.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from ...errors import BackendError
from .client import StorageClient
from .errors import BACKEND, raise_for_status, translate


async def start_upload_session(
    client: StorageClient,
    bucket: str,
    name: str,
    *,
    content_type: str | None = None,
    size: int | None = None,
    origin: str | None = None,
) -> str:
    """Start a resumable upload of ``bucket``/``name``; the session URI.

    Args:
        content_type: the object's content type (Cloud Storage's default otherwise).
        size: the object's size, when known: the upload must then be exactly that long.
        origin: the browser origin that will upload.

    Raises:
        NotFound, PermissionDenied, BackendError, Unavailable: as :func:`translate` maps them.
    """
    url = f"{client.api_root}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
    headers = await client.auth_headers()
    headers["Content-Type"] = "application/json; charset=UTF-8"
    metadata: dict[str, str] = {"name": name}
    if content_type is not None:
        headers["X-Upload-Content-Type"] = content_type
        metadata["contentType"] = content_type
    if size is not None:
        headers["X-Upload-Content-Length"] = str(size)
    if origin is not None:
        headers["Origin"] = origin
    with translate(bucket, name):
        async with client.session.post(
            url,
            params={"uploadType": "resumable"},
            headers=headers,
            data=json.dumps(metadata),
            timeout=client.timeout,
        ) as response:
            await raise_for_status(response)
            location = response.headers.get("Location")
    if not location:
        raise BackendError(BACKEND, "the upload session was started without a session URI")
    return location


__all__ = ["start_upload_session"]
