"""Batching publisher: many concurrent requests, few Pub/Sub calls, never blocking the loop.

Requests hand their messages to :meth:`Publisher.publish` and await the message ids. Messages are
gathered per topic (and per ordering key) into batches. Batching adapts to load: when nothing of the
key is in flight, a batch goes at the next loop turn (no added latency when idle). While a batch is
in flight, the next one gathers messages until it is full (``max_messages`` / ``max_bytes``: it goes
at once) or an answer comes back; with ``max_in_flight`` above one (the default is one), it also goes
after ``max_latency`` while fewer than that many batches of its key are in flight. Every call costs
CPU here and in Pub/Sub whatever its size, so under load few large calls serve more requests than
many small ones.
Batches of one ordering key are sent one after the other, so the key's order holds, and when one
fails the batches queued behind it fail too rather than overtake it.

Transient errors (unavailable, deadline, aborted, internal, resource exhausted) are retried with
exponential backoff within ``publish_timeout``. The pending messages and bytes are bounded: past the
bound ``publish`` raises :class:`PublisherOverloaded` (503) instead of growing memory.

A caller is answered only once Pub/Sub has returned the ids, so an answered message is never lost;
:meth:`aclose` flushes every accepted message before closing the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from google.api_core import exceptions as gexc
from google.api_core.retry import AsyncRetry, if_exception_type
from google.pubsub_v1 import PublisherAsyncClient
from google.pubsub_v1.types import PublishRequest

from ... import metrics
from ...errors import BackendError, PublisherOverloaded, Unavailable
from ...loopclients import ForeignLoopError
from .batches import Batch, BatchSettings, Request
from .errors import translate
from .messages import RAW_RESPONSE_OF, OutgoingMessage, wire_size

if TYPE_CHECKING:
    from ...tracing import PublishTrace

log = logging.getLogger("loopgate.publisher")

TRANSIENT = (
    gexc.ServiceUnavailable,
    gexc.DeadlineExceeded,
    gexc.Aborted,
    gexc.InternalServerError,
    gexc.ResourceExhausted,
    gexc.Unknown,
)


class Publisher:
    """Batches publishes of one event loop onto one ``PublisherAsyncClient``."""

    def __init__(self, client: PublisherAsyncClient, settings: BatchSettings) -> None:
        self._client = client
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._open: dict[tuple[str, str], Batch] = {}
        self._key_tails: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._in_flight: set[asyncio.Task[bool]] = set()
        self._busy: dict[tuple[str, str], int] = {}  # batches in flight per (topic, key)
        self._calls: dict[int, float] = {}  # id(batch) -> when its publish call began, oldest first
        self._pending_messages = 0
        self._pending_bytes = 0
        self._closed = False
        self._retry = AsyncRetry(
            predicate=if_exception_type(*TRANSIENT),
            initial=0.05,
            maximum=2.0,
            multiplier=2.0,
            timeout=settings.timeout,
        )

    @property
    def client(self) -> PublisherAsyncClient:
        """The underlying generated client (for admin calls such as ``get_topic``)."""
        return self._client

    @property
    def pending_messages(self) -> int:
        return self._pending_messages

    def oldest_call_age(self) -> float:
        """Seconds the oldest publish call in flight has waited for Pub/Sub (retries included);
        0 when no call is in flight."""
        for started in self._calls.values():  # in insertion order: the first began first
            return time.monotonic() - started
        return 0.0

    async def publish(
        self,
        topic: str,
        messages: Sequence[OutgoingMessage],
        trace: PublishTrace | None = None,
    ) -> list[str]:
        """Publish ``messages`` to ``topic`` (a full path).

        Returns the message ids in the order of ``messages``. ``trace``: the messages' create
        spans (see :mod:`service.tracing`), when the app traces; their batches' calls get spans.

        Raises:
            PublisherOverloaded: the pending bounds are reached; nothing was accepted.
            TopicNotFound: the topic does not exist.
            BackendError: Pub/Sub failed after retries (some messages may have been published).
            Unavailable: the publisher is closing.
        """
        if asyncio.get_running_loop() is not self._loop:
            raise ForeignLoopError("publisher")
        if self._closed:
            raise Unavailable("the publisher is shutting down", retry_after=1)
        sizes = [wire_size(message) for message in messages]
        total = sum(sizes)
        settings = self._settings
        if (
            self._pending_messages + len(messages) > settings.max_pending_messages
            or self._pending_bytes + total > settings.max_pending_bytes
        ):
            raise PublisherOverloaded(
                f"too many messages waiting to be published ({self._pending_messages} pending); "
                "try again shortly"
            )
        self._pending_messages += len(messages)
        self._pending_bytes += total
        metrics.PUBLISH_PENDING.inc(len(messages))
        request = Request(self._loop, len(messages))
        start = 0
        while start < len(messages):
            start = self._add(topic, messages, sizes, request, start, trace)
        started = time.perf_counter()
        ids = await request.future
        metrics.PUBLISH_LATENCY.observe(time.perf_counter() - started)
        return ids

    def _add(
        self,
        topic: str,
        messages: Sequence[OutgoingMessage],
        sizes: list[int],
        request: Request,
        start: int,
        trace: PublishTrace | None,
    ) -> int:
        """Add the run of ``messages`` from ``start`` that goes into one batch; returns its end.

        A run ends at a change of ordering key or when the batch is full.
        """
        ordering_key = messages[start].ordering_key
        key = (topic, ordering_key)
        batch = self._open.get(key)
        settings = self._settings
        if batch is not None and (
            batch.count >= settings.max_messages or batch.size + sizes[start] > settings.max_bytes
        ):
            self._seal(key)
            batch = None
        if batch is None:
            batch = Batch(topic, ordering_key)
            self._open[key] = batch
            if not self._busy.get(key) or settings.max_latency == 0:
                # Nothing of this key in flight: send at the next loop turn, together with
                # whatever else this turn adds, rather than wait for the latency trigger.
                batch.timer = self._loop.call_soon(self._seal, key)
            else:
                batch.timer = self._loop.call_later(settings.max_latency, self._on_timer, key)
        room = settings.max_messages - batch.count
        size = batch.size + sizes[start]  # the first message always goes in, however large
        end = start + 1
        limit = min(len(messages), start + room)
        while end < limit and messages[end].ordering_key == ordering_key:
            if size + sizes[end] > settings.max_bytes:
                break
            size += sizes[end]
            end += 1
        add = batch.request.messages.add
        for index in range(start, end):
            message = messages[index]
            if message.attributes:
                add(data=message.data, ordering_key=ordering_key).attributes.update(
                    message.attributes
                )
            else:
                add(data=message.data, ordering_key=ordering_key)
        if trace is not None:
            trace.add_to(batch, start, end)
        batch.count += end - start
        batch.owners.append((request, start, end - start))
        batch.size = size
        if batch.count >= settings.max_messages or size >= settings.max_bytes:
            self._seal(key)
        return end

    def _on_timer(self, key: tuple[str, str]) -> None:
        # At the in-flight cap the batch waits for the next answer of its key instead (see
        # _on_sent): more concurrent calls would only shrink batches, and every call costs CPU
        # here and in Pub/Sub whatever its size.
        if self._busy.get(key, 0) < self._settings.max_in_flight:
            self._seal(key)

    def _seal(self, key: tuple[str, str]) -> None:
        batch = self._open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        previous = self._key_tails.get(key) if batch.ordering_key else None
        task = self._loop.create_task(self._send(batch, previous))
        if batch.ordering_key:
            self._key_tails[key] = task
            task.add_done_callback(functools.partial(self._forget_tail, key))
        self._busy[key] = self._busy.get(key, 0) + 1
        task.add_done_callback(functools.partial(self._on_sent, key))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    def _on_sent(self, key: tuple[str, str], task: asyncio.Future[bool]) -> None:
        busy = self._busy[key] - 1
        if busy:
            self._busy[key] = busy
        else:
            del self._busy[key]
        if key not in self._open:
            return
        if key[1] and (task.cancelled() or not task.result()):
            # The key's order is broken: what gathered behind the failed batch fails too.
            self._fail_open(key, _ordering_error(key[1]))
        else:
            # An answer frees a slot: the batch that gathered meanwhile goes now.
            self._seal(key)

    def _fail_open(self, key: tuple[str, str], error: Exception) -> None:
        batch = self._open.pop(key)
        if batch.timer is not None:
            batch.timer.cancel()
        for owner, _, _ in batch.owners:
            owner.fail(error)
        self._release(batch)

    def _release(self, batch: Batch) -> None:
        self._pending_messages -= batch.count
        self._pending_bytes -= batch.size
        metrics.PUBLISH_PENDING.dec(batch.count)

    def _forget_tail(self, key: tuple[str, str], task: asyncio.Future[bool]) -> None:
        if self._key_tails.get(key) is task:
            del self._key_tails[key]

    async def _send(self, batch: Batch, previous: asyncio.Future[bool] | None) -> bool:
        """Publish one batch and answer its owners; ``False`` when it failed."""
        try:
            if previous is not None:
                await asyncio.wait([previous])
                if previous.cancelled() or not previous.result():
                    raise _ordering_error(batch.ordering_key)
            self._calls[id(batch)] = time.monotonic()
            try:
                with _NO_SPAN if batch.trace is None else batch.trace.publish_span(batch):
                    response = await self._client.publish(
                        request=PublishRequest.wrap(batch.request),
                        retry=self._retry,
                        timeout=min(60.0, self._settings.timeout),
                    )
            except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
                if not isinstance(exc, gexc.NotFound):  # a missing topic is no batch error
                    metrics.PUBLISH_BATCH_ERRORS.labels(reason=type(exc).__name__).inc()
                raise translate(
                    exc, topic=batch.topic, operation="publish", timeout=self._settings.timeout
                ) from exc
            finally:
                del self._calls[id(batch)]
            ids = list(RAW_RESPONSE_OF(response).message_ids)
            if len(ids) != batch.count:
                raise BackendError("pubsub", "publish answered a wrong number of message ids")
            metrics.PUBLISH_BATCH_SIZE.observe(len(ids))
            metrics.PUBLISH_MESSAGES.inc(len(ids))
            offset = 0
            for owner, start, count in batch.owners:
                owner.resolve(start, ids[offset : offset + count])
                offset += count
            return True
        except Exception as exc:
            for owner, _, _ in batch.owners:
                owner.fail(exc)
            return False
        except BaseException:
            error = Unavailable("publishing was cancelled by shutdown", retry_after=1)
            for owner, _, _ in batch.owners:
                owner.fail(error)
            raise
        finally:
            self._release(batch)

    async def flush(self) -> None:
        """Send every open batch now and wait until every batch sent so far is answered."""
        for key in list(self._open):
            self._seal(key)
        while self._in_flight:
            await asyncio.wait(list(self._in_flight))

    async def aclose(self) -> None:
        """Stop accepting messages, flush every accepted one, then close the channel."""
        self._closed = True
        try:
            await self.flush()
        finally:
            await self._client.transport.close()  # type: ignore[no-untyped-call]  # unannotated in the generated client


_NO_SPAN = contextlib.nullcontext()


def _ordering_error(ordering_key: str) -> BackendError:
    return BackendError(
        "pubsub",
        f"an earlier publish with ordering key {ordering_key!r} failed; later messages of the "
        "key were not published to keep its order",
    )
