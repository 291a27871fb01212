"""Cloud Storage's rules for bucket and object names, and loopgate's list page tokens."""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from typing import Any

from ...config import current_settings
from ...errors import InvalidArgument, NotFound

MAX_NAME_BYTES = 1024
MAX_PAGE_SIZE = 1000
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
RESERVED_PREFIX = ".well-known/acme-challenge/"


def check_bucket(bucket: str) -> None:
    """The bucket must be in ``LOOPGATE_BUCKETS`` (404 otherwise) and well formed (400)."""
    if not current_settings().bucket_allowed(bucket):
        raise NotFound(f"bucket {bucket[:300]!r} is not served here", resource=bucket)
    if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
        raise InvalidArgument(
            f"invalid bucket name {bucket[:300]!r}: 3-222 characters of lower-case letters, "
            "digits, '-', '_' and '.', starting and ending with a letter or digit"
        )


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid object name, or ``None`` when it is."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid UTF-8"
    if size == 0 or size > MAX_NAME_BYTES:
        return f"it must be 1-{MAX_NAME_BYTES} bytes of UTF-8, not {size}"
    if name in (".", ".."):
        return "'.' and '..' are not allowed"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "it contains a control character"
    if name.startswith(RESERVED_PREFIX):
        return f"names starting with {RESERVED_PREFIX!r} are reserved"
    return None


def check_name(name: str) -> None:
    """Raise :class:`InvalidArgument` for a name Cloud Storage would refuse."""
    problem = name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise InvalidArgument(f"invalid object name {shown!r}: {problem}")


# -- page tokens ------------------------------------------------------------------------------
#
# A page token is loopgate's own: the position after the page's last entry. The next page asks the
# backend for names from that position on (``startOffset``) and drops what lies before it, so paging
# works alike on Cloud Storage and on an emulator that ignores ``maxResults`` and ``pageToken``.


def encode_token(start: str, skip: str | None) -> str:
    raw = json.dumps({"s": start, "k": skip}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[str, str | None]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        start, skip = data["s"], data["k"]
        if not isinstance(start, str) or not (skip is None or isinstance(skip, str)):
            raise TypeError
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument("invalid pageToken: pass the nextPageToken of a page") from None
    return start, skip


def after(key: str) -> str:
    """The smallest string greater than every string that starts with ``key``."""
    return key[:-1] + chr(ord(key[-1]) + 1)


def page(
    items: list[dict[str, Any]],
    prefixes: list[str],
    *,
    start: str,
    skip: str | None,
    size: int,
    more: bool,
) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """Cut one page of ``size`` entries (objects and prefixes together, in name order) from what
    the backend answered; ``more`` says the backend has entries beyond its answer."""
    entries: list[tuple[str, dict[str, Any] | None]] = [(item["name"], item) for item in items]
    entries += [(prefix, None) for prefix in prefixes]
    entries = sorted(
        (entry for entry in entries if entry[0] >= start and entry[0] != skip),
        key=lambda entry: entry[0],
    )
    kept, rest = entries[:size], entries[size:]
    token = None
    if kept and (rest or more):
        last, item = kept[-1]
        token = encode_token(last, last) if item is not None else encode_token(after(last), None)
    return (
        [item for _, item in kept if item is not None],
        [key for key, item in kept if item is None],
        token,
    )
