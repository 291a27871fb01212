"""What a Cloud Storage media response says about the object it carries.

A plain read needs the object's length, ETag and content type; the media response carries them,
so serving it needs no separate metadata request (one backend round trip instead of two).
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDictProxy
from werkzeug.http import unquote_etag


@dataclass(frozen=True)
class MediaInfo:
    """What a media (``alt=media``) response says about the object it carries."""

    size: int
    etag: str
    content_type: str
    generation: str | None


def media_info(headers: CIMultiDictProxy[str]) -> MediaInfo | None:
    """The object as described by a full (not ranged) media response's headers.

    Cloud Storage sends the object's ``ETag`` and ``X-Goog-Generation``; the emulator sends
    neither but an ``X-Goog-Hash`` whose MD5 is the object's etag there. ``None`` when the
    headers do not say enough: no length, no ETag nor MD5, or a ``Content-Encoding`` (the body
    aiohttp hands on is then not the stored bytes).
    """
    length = headers.get("Content-Length", "")
    if not length.isdigit() or headers.get("Content-Encoding"):
        return None
    etag = unquote_etag(headers.get("ETag"))[0] or _md5(headers.getall("X-Goog-Hash", []))
    if not etag:
        return None
    return MediaInfo(
        size=int(length),
        etag=etag,
        content_type=headers.get("Content-Type") or "application/octet-stream",
        generation=headers.get("X-Goog-Generation"),
    )


def _md5(hash_headers: list[str]) -> str | None:
    for header in hash_headers:
        for part in header.split(","):
            kind, _, value = part.strip().partition("=")
            if kind == "md5" and value:
                return value
    return None


__all__ = ["MediaInfo", "media_info"]
