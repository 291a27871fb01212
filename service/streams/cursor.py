"""Resume cursors: the ``id`` of every message a topic stream sends, and how a reconnecting
subscriber's ``lastEventId`` is read back.

A cursor is opaque to clients: a URL-safe string of at most :data:`MAX_LENGTH` bytes. It names no
worker-local position, so any worker of any instance can resume from it: it carries a version, a
short tag of the topic (a cursor of one topic is refused on another), the message's publish time
in microseconds (Pub/Sub's clock) and its message id::

    1.<tag>.<publish time, µs since the epoch>.<message id>

A message id that is not made of ``[0-9A-Za-z_-]`` is written base64url-encoded (unpadded) after a ``~``; one
too long for the bound is left out (the cursor then resumes by time alone).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from datetime import UTC, datetime
from typing import NamedTuple

from ..errors import InvalidArgument

VERSION = "1"
MAX_LENGTH = 200
PLAIN_ID = re.compile(r"[0-9A-Za-z_-]{1,160}")
CURSOR = re.compile(
    r"1\.([0-9a-f]{8})\.([0-9]{1,17})\.(~[0-9A-Za-z_-]{1,180}|[0-9A-Za-z_-]{0,160})"
)


class Cursor(NamedTuple):
    """A decoded cursor: where a subscriber stopped."""

    published_us: int  # the publish time of the last message it received, µs since the epoch
    message_id: str  # "" when the cursor resumes by time alone

    @property
    def published(self) -> float:
        """The publish time in seconds since the epoch."""
        return self.published_us / 1e6


def topic_tag(topic: str) -> str:
    """The short tag of ``topic`` in its cursors (8 hex digits of a hash of its name)."""
    return hashlib.blake2b(topic.encode(), digest_size=4).hexdigest()


def encode_cursor(tag: str, published_us: int, message_id: str) -> str:
    """The cursor of a message of the topic tagged ``tag`` (see :func:`topic_tag`)."""
    if not message_id or (message_id.isdigit() and message_id.isascii()):
        written = message_id  # Pub/Sub's message ids are decimal; none: a time alone
    elif PLAIN_ID.fullmatch(message_id):
        written = message_id
    else:
        written = "~" + base64.urlsafe_b64encode(message_id.encode()).decode("ascii").rstrip("=")
    cursor = f"{VERSION}.{tag}.{published_us}.{written}"
    if len(cursor) > MAX_LENGTH:
        cursor = f"{VERSION}.{tag}.{published_us}."
    return cursor


def decode_cursor(cursor: str, topic: str) -> Cursor:
    """Read a subscriber's ``lastEventId`` for ``topic``.

    Raises:
        InvalidArgument: it is not a cursor of this server, or it is one of another topic.
    """
    match = CURSOR.fullmatch(cursor) if len(cursor) <= MAX_LENGTH else None
    if match is None:
        raise InvalidArgument(
            f"invalid lastEventId {cursor[:MAX_LENGTH]!r}: pass the id of the last message "
            "received from this stream"
        )
    tag, published, written = match.groups()
    if tag != topic_tag(topic):
        raise InvalidArgument(f"lastEventId {cursor!r} is the id of a message of another topic")
    message_id = written
    if written.startswith("~"):
        try:
            encoded = written[1:] + "=" * (-len(written[1:]) % 4)
            message_id = base64.urlsafe_b64decode(encoded.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise InvalidArgument(f"invalid lastEventId {cursor!r}") from None
    return Cursor(int(published), message_id)


class Resumption(NamedTuple):
    """How a stream starts: the fields of its ``subscribed`` frame after ``topic``.

    ``resumed``: a cursor was given and messages after it are replayed; ``complete``: nothing
    published after the cursor is missing; ``earliest``: when not complete, the earliest publish
    time (seconds since the epoch) from which messages are still available.
    """

    resumed: bool = False
    complete: bool = True
    earliest: float | None = None

    def fields(self) -> dict[str, object]:
        fields: dict[str, object] = {"resumed": self.resumed, "complete": self.complete}
        if not self.complete and self.earliest is not None:
            fields["earliest"] = rfc3339(self.earliest)
        return fields


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as ``2025-01-01T00:00:00.123456Z``."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
