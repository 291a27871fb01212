"""A Python client of loopgate's topic streams, on aiohttp.

Example::

    from service.sdk import subscribe

    async with subscribe("https://loopgate.example.com", "orders", token=TOKEN) as messages:
        async for message in messages:
            handle(message.data, message.attributes)

See :mod:`service.sdk.subscriber` for how it reconnects and resumes. It depends on aiohttp and
the standard library only.
"""

from __future__ import annotations

from .errors import (
    BadRequest,
    Forbidden,
    NotFound,
    PolicyViolation,
    ProtocolError,
    SubscribeError,
    Unauthorized,
)
from .messages import Dropped, Message, Reconnecting, Status, Subscribed
from .subscriber import Subscription, subscribe

__all__ = [
    "BadRequest",
    "Dropped",
    "Forbidden",
    "Message",
    "NotFound",
    "PolicyViolation",
    "ProtocolError",
    "Reconnecting",
    "Status",
    "SubscribeError",
    "Subscribed",
    "Subscription",
    "Unauthorized",
    "subscribe",
]
