"""What a subscriber hands out: messages, and status notices about the stream.

:func:`decode_frame` reads one websocket frame, or the ``data`` of one Server-Sent Event: both
carry the same JSON (``subscribed``, ``message``, ``messages``, ``dropped``).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Message:
    """One message published to the topic.

    Attributes:
        message_id: Pub/Sub's message id (duplicates share it).
        data: the payload.
        attributes: the message's attributes.
        id: its resume cursor: opaque, pass it back as ``last_event_id`` to resume after it.
        publish_time: when Pub/Sub received it (timezone-aware, UTC).
        ordering_key: the ordering key it was published with, ``""`` when none.
    """

    message_id: str
    data: bytes = field(repr=False)
    attributes: dict[str, str]
    id: str
    publish_time: datetime
    ordering_key: str = ""


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A connection started: the first frame of every stream, after each reconnect too.

    Attributes:
        topic: the topic.
        id: the cursor the stream starts from (the one resumed from, or one of this moment).
        resumed: the server resumed from the cursor the client passed.
        complete: everything since that cursor is coming; when ``False`` some is no longer
            available (the topic retains too little) and ``earliest`` tells from when it is.
        earliest: the earliest publish time still available, when not ``complete``.
    """

    topic: str
    id: str
    resumed: bool = False
    complete: bool = True
    earliest: datetime | None = None


@dataclass(frozen=True, slots=True)
class Dropped:
    """The server dropped ``count`` messages this client read too slowly to take."""

    count: int


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection ended (or could not be made); the subscriber connects again in ``delay``
    seconds.

    Attributes:
        delay: seconds until the next attempt.
        reason: what ended it: a close code and reason, an HTTP status, a network error.
        attempt: how many attempts in a row have failed (0 after a normal close).
    """

    delay: float
    reason: str
    attempt: int


Status = Subscribed | Dropped | Reconnecting


def decode_frame(text: str) -> list[Message | Subscribed | Dropped]:
    """The messages and notices of one frame; frame types this client does not know give none.

    Raises:
        ProtocolError: the text is not a frame of a loopgate stream.
    """
    try:
        frame = json.loads(text)
        kind = frame.get("type")
        if kind == "message":
            return [_message(frame)]
        if kind == "messages":
            return [_message(item) for item in frame["messages"]]
        if kind == "dropped":
            return [Dropped(int(frame["count"]))]
        if kind == "subscribed":
            earliest = frame.get("earliest")
            return [
                Subscribed(
                    topic=str(frame.get("topic", "")),
                    id=str(frame["id"]),
                    resumed=bool(frame.get("resumed", False)),
                    complete=bool(frame.get("complete", True)),
                    earliest=_time(earliest) if earliest else None,
                )
            ]
        return []
    except (ValueError, TypeError, KeyError, AttributeError, binascii.Error) as exc:
        raise ProtocolError(f"not a frame of a loopgate stream: {text[:200]!r}") from exc


def _message(item: Any) -> Message:
    return Message(
        message_id=str(item["messageId"]),
        data=base64.b64decode(item["data"], validate=True),
        attributes={str(key): str(value) for key, value in item.get("attributes", {}).items()},
        id=str(item["id"]),
        publish_time=_time(item["publishTime"]),
        ordering_key=str(item.get("orderingKey") or ""),
    )


def _time(text: Any) -> datetime:
    if not isinstance(text, str):
        raise TypeError("a time is a string")
    return datetime.fromisoformat(text)
