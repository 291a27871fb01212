"""Messages on their way to Pub/Sub: what a route hands the publisher, and its size on the wire.

The publisher writes each message straight into its batch's ``PublishRequest`` protobuf (the raw
protobuf classes below, not proto-plus wrappers, which copy on every access).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from google.pubsub_v1.types import PublishRequest, PublishResponse, PubsubMessage

RAW_MESSAGE: Any = PubsubMessage.pb()
RAW_REQUEST: Any = PublishRequest.pb()
RAW_RESPONSE_OF: Any = PublishResponse.pb  # the protobuf inside a proto-plus response


class OutgoingMessage(NamedTuple):
    """A message to publish. A raw ``PubsubMessage`` protobuf has the same three fields and is
    accepted too."""

    data: bytes
    attributes: dict[str, str] | None = None
    ordering_key: str = ""


def wire_size(message: Any) -> int:
    """A bound on the bytes ``message`` takes in a publish request (tags and lengths counted at
    their largest)."""
    size = len(message.data) + 12
    attributes = message.attributes
    if attributes:
        for key, value in attributes.items():
            size += _utf8_len(key) + _utf8_len(value) + 18
    key = message.ordering_key
    if key:
        size += _utf8_len(key) + 6
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())
