"""Cloud Storage's rules for bucket and object names, and loopgate's list page tokens.

Object names are checked as the client sent them. The server decodes a request's path before
routing, replacing bytes that are not UTF-8 with U+FFFD, so ``%FF`` and ``%ED%A0%80`` (an encoded
surrogate) would both become the name ``"\ufffd"``: two names, one object. :func:`check_name`
therefore takes the raw, percent-encoded path too and refuses (400) any escape that does not
decode strictly as UTF-8; :func:`check_query` does the same for a listing's parameters, whose
undecodable bytes werkzeug would otherwise keep as the literal text ``%FF``.

Cloud Storage forbids the names ``.`` and ``..``. It allows ``.`` and ``..`` as segments inside a
name (``a/../b``), but loopgate refuses them too: it maps names to URL paths, where such segments
are resolved away by clients, proxies and path-based tools (and dropped by the storage emulator),
so such an object could be written but not reliably read or deleted. A listing's ``prefix`` is not
a path and may hold them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from typing import Any
from urllib.parse import unquote_to_bytes

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
    if any(segment in (".", "..") for segment in name.split("/")):
        return "'.' and '..' are not allowed as segments between '/'"
    if any(unicodedata.category(char) == "Cc" for char in name):
        return "it contains a control character"
    if name.startswith(RESERVED_PREFIX):
        return f"names starting with {RESERVED_PREFIX!r} are reserved"
    return None


def undecodable(raw: bytes) -> str | None:
    """The first bytes of percent-encoded ``raw`` that are not UTF-8 (percent-encoded), or
    ``None`` when all of it decodes. Encoded surrogates and overlong forms do not decode."""
    data = unquote_to_bytes(raw)
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return "".join(f"%{byte:02X}" for byte in data[exc.start : exc.end])
    return None


def check_name(name: str, raw_path: bytes | None = None) -> None:
    """Raise :class:`InvalidArgument` for a name Cloud Storage would refuse.

    Arguments:
        name: the object name, as decoded from the request's path.
        raw_path: the request's path as sent (percent-encoded, the ASGI ``raw_path``), when
            known. Checked after the route matched and the bucket was checked, a byte in it
            that is not UTF-8 can only be in the name.
    """
    bad = undecodable(raw_path) if raw_path is not None else None
    if bad is not None:
        raise InvalidArgument(f"invalid object name: it is not valid UTF-8 ({bad} does not decode)")
    problem = name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 100 else name[:100] + "..."
        raise InvalidArgument(f"invalid object name {shown!r}: {problem}")


def check_query(query_string: bytes) -> None:
    """Raise :class:`InvalidArgument` for a query parameter (name or value) that is not UTF-8."""
    for field in query_string.split(b"&"):
        for part in field.partition(b"=")[::2]:
            bad = undecodable(part)
            if bad is not None:
                shown = unquote_to_bytes(field.partition(b"=")[0]).decode("utf-8", "replace")
                raise InvalidArgument(
                    f"invalid query parameter {shown[:100]!r}: it is not valid UTF-8 "
                    f"({bad} does not decode)"
                )


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
