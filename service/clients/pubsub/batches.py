"""What the publisher gathers: its settings, each caller's request, and each batch being built."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .messages import RAW_REQUEST


@dataclass(frozen=True)
class BatchSettings:
    """How the publisher batches (see :mod:`.publisher`); every field has a setting."""

    max_messages: int = 1000
    max_bytes: int = 4_000_000
    max_latency: float = 0.005
    max_in_flight: int = 1
    timeout: float = 30.0
    max_pending_messages: int = 100_000
    max_pending_bytes: int = 128 * 1024 * 1024


class Request:
    """One caller's messages: answered when all of them have ids, or at the first failure."""

    __slots__ = ("future", "ids", "remaining")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.future: asyncio.Future[list[str]] = loop.create_future()
        self.ids: list[str] = [""] * count
        self.remaining = count

    def resolve(self, start: int, message_ids: Sequence[str]) -> None:
        """Take the ids of this caller's messages ``start``, ``start + 1``, ..."""
        self.ids[start : start + len(message_ids)] = message_ids
        self.remaining -= len(message_ids)
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.ids)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Batch:
    """One publish call being gathered: messages go straight into its request, so they are
    built once, not built by the caller and copied into the request."""

    topic: str
    ordering_key: str
    request: Any = None  # a raw PublishRequest protobuf
    count: int = 0
    # (caller, index of its first message, count): each caller's run of messages in this batch
    owners: list[tuple[Request, int, int]] = field(default_factory=list)
    size: int = 0
    timer: asyncio.Handle | None = None
    trace: Any = None  # a service.tracing.BatchTrace when it carries traced messages

    def __post_init__(self) -> None:
        self.request = RAW_REQUEST(topic=self.topic)
