"""A reconnecting, resuming subscriber of a loopgate topic stream, on aiohttp.

:func:`subscribe` returns a :class:`Subscription`: an async iterator of :class:`Message` that
connects (websocket ``/v1/topics/{topic}/stream`` or SSE ``/v1/topics/{topic}/events``), reads
``message`` and coalesced ``messages`` frames, and when the connection ends connects again,
resuming after the last message it handed out (``?lastEventId=`` on the websocket, the
``Last-Event-ID`` header for SSE; before the first message, the ``subscribed`` frame's ``id``).
Messages that come twice (near a resume point, or Pub/Sub's at-least-once delivery) are dropped
by ``messageId`` within a bounded window.

How each end is met:

- websocket close 1000 (idle) or 1001 (the server is going away), or an SSE stream that ended
  after delivering messages: reconnect at once, after a small jitter (up to ``initial_delay``);
- close 1008: raise :class:`~service.sdk.errors.PolicyViolation`;
- close 1013 or 1011, a network error, no data for ``receive_timeout``, a handshake answered
  429, 5xx or 503: reconnect after an exponential backoff with full jitter (``initial_delay``
  doubling up to ``max_delay``), and never before the answer's ``Retry-After``;
- a handshake answered 400, 401, 403, 404 or another 4xx: raise the matching
  :class:`~service.sdk.errors.SubscribeError`.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Literal
from urllib.parse import quote

import aiohttp

from .connections import Connection, Ended, open_event_stream, open_websocket, retry_after
from .messages import Message, Reconnecting, Status, Subscribed, decode_frame

Transport = Literal["websocket", "sse"]
Token = str | Callable[[], str | Awaitable[str]]
StatusCallback = Callable[[Status], Awaitable[None] | None]

CONNECT_TIMEOUT = 30.0  # seconds for a connection's handshake, up to its first byte of stream


class Backoff:
    """Exponential backoff with full jitter: the n-th delay in a row is uniform in
    ``[0, min(maximum, initial * 2**n))``.

    Args:
        initial: the ceiling of the first delay, in seconds.
        maximum: the largest ceiling.
        rng: uniform random numbers in ``[0, 1)``.
    """

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[], float] = random.random
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial_delay <= max_delay")
        self.initial = initial
        self.maximum = maximum
        self.attempt = 0  # failures in a row
        self._rng = rng

    def ceiling(self) -> float:
        """The ceiling of the next delay."""
        return min(self.maximum, self.initial * 2.0 ** min(self.attempt, 64))

    def next(self) -> float:
        """The next delay; counts one more failure."""
        delay = self._rng() * self.ceiling()
        self.attempt += 1
        return delay

    def jitter(self) -> float:
        """A small delay for a prompt reconnect (in ``[0, initial)``); resets the failures."""
        self.attempt = 0
        return self._rng() * self.initial


class Dedupe:
    """The ``window`` message ids seen last (least recently seen forgotten first)."""

    def __init__(self, window: int) -> None:
        self.window = max(0, window)
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, message_id: str) -> bool:
        """Whether ``message_id`` is in the window; records it either way."""
        if not self.window:
            return False
        if message_id in self._ids:
            self._ids.move_to_end(message_id)
            return True
        self._ids[message_id] = None
        if len(self._ids) > self.window:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


class Subscription:
    """The messages of a topic, as an async iterator that reconnects and resumes by itself.

    Use it as ``async with subscribe(...) as messages: async for message in messages: ...``, or
    call :meth:`aclose` when done (also from another task: the iteration then ends). Iterate it
    from one task at a time. Arguments: see :func:`subscribe`.
    """

    def __init__(
        self,
        base_url: str,
        topic: str,
        *,
        token: Token | None = None,
        transport: Transport = "websocket",
        last_event_id: str | None = None,
        session: aiohttp.ClientSession | None = None,
        dedupe_window: int = 1000,
        initial_delay: float = 0.25,
        max_delay: float = 30.0,
        receive_timeout: float | None = 60.0,
        on_status: StatusCallback | None = None,
        rng: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if transport not in ("websocket", "sse"):
            raise ValueError(f"transport is 'websocket' or 'sse', not {transport!r}")
        path = "stream" if transport == "websocket" else "events"
        self.url = f"{base_url.rstrip('/')}/v1/topics/{quote(topic, safe='')}/{path}"
        self.topic = topic
        self.transport: Transport = transport
        self._last_event_id = last_event_id or None
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._dedupe = Dedupe(dedupe_window)
        self._backoff = Backoff(initial_delay, max_delay, rng)
        self._receive_timeout = receive_timeout
        self._on_status = on_status
        self._sleep = sleep
        self._connection: Connection | None = None
        self._delivered = 0  # messages the current connection brought
        self._ready: deque[Message] = deque()
        self._closed = False
        self._closing = asyncio.Event()

    @property
    def last_event_id(self) -> str | None:
        """The cursor to resume from: the ``id`` of the last message handed out, or before the
        first, of the last ``subscribed`` frame (``None`` until connected, unless given)."""
        return self._last_event_id

    @property
    def closed(self) -> bool:
        return self._closed

    def __aiter__(self) -> Subscription:
        return self

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __anext__(self) -> Message:
        while True:
            if self._closed:
                raise StopAsyncIteration
            while self._ready:
                message = self._ready.popleft()
                if not self._dedupe.seen(message.message_id):
                    self._last_event_id = message.id
                    return message
            try:
                await self._receive()
            except Ended as ended:
                await self._disconnect()
                if self._closed:
                    raise StopAsyncIteration from None
                await self._pause(ended)
            except asyncio.CancelledError:
                raise
            except BaseException:
                closed = self._closed
                await self.aclose()
                if closed:  # closed from another task: whatever the connection raised, it ends
                    raise StopAsyncIteration from None
                raise

    async def aclose(self) -> None:
        """Close the connection (and the session, when the subscription made it); iteration ends."""
        self._closed = True
        self._closing.set()
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def _receive(self) -> None:
        """Read one frame (connecting first when needed) into the ready messages."""
        if self._connection is None:
            connection = await self._open()
            if self._closed:
                await connection.close()
                raise Ended("closed")
            self._connection, self._delivered = connection, 0
        for item in decode_frame(await self._connection.receive()):
            if isinstance(item, Message):
                self._ready.append(item)
                self._delivered += 1
                self._backoff.attempt = 0
            else:
                if isinstance(item, Subscribed):
                    self._last_event_id = item.id
                await self._report(item)

    async def _open(self) -> Connection:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers: dict[str, str] = {}
        token = await self._current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                opening = open_websocket if self.transport == "websocket" else open_event_stream
                return await opening(
                    self._session, self.url, headers, self._last_event_id, self._receive_timeout
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise Ended(f"could not connect: {exc!r}") from exc

    async def _current_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        token = self._token()
        return await token if inspect.isawaitable(token) else token

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _pause(self, ended: Ended) -> None:
        normal = self._delivered > 0 if ended.normal is None else ended.normal
        delay = self._backoff.jitter() if normal else self._backoff.next()
        if ended.retry_after is not None:
            delay = max(delay, ended.retry_after)
        await self._report(Reconnecting(delay, ended.reason, self._backoff.attempt))
        sleeper = asyncio.ensure_future(self._sleep(delay))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({sleeper, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sleeper, closing):
                task.cancel()
            await asyncio.gather(sleeper, closing, return_exceptions=True)

    async def _report(self, status: Status) -> None:
        if self._on_status is not None:
            result = self._on_status(status)
            if inspect.isawaitable(result):
                await result


def subscribe(
    base_url: str,
    topic: str,
    *,
    token: Token | None = None,
    transport: Transport = "websocket",
    last_event_id: str | None = None,
    session: aiohttp.ClientSession | None = None,
    dedupe_window: int = 1000,
    initial_delay: float = 0.25,
    max_delay: float = 30.0,
    receive_timeout: float | None = 60.0,
    on_status: StatusCallback | None = None,
    rng: Callable[[], float] = random.random,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Subscription:
    """Subscribe to ``topic`` on the loopgate at ``base_url``; nothing connects until iterated.

    Args:
        base_url: e.g. ``https://loopgate.example.com`` (``http``/``https``; also for websockets).
        topic: the topic's short name.
        token: an API token or JWT, or a function (plain or async) called before each
            connection, for tokens that expire.
        transport: ``"websocket"`` or ``"sse"``.
        last_event_id: a cursor (a :attr:`Message.id`, or :attr:`Subscription.last_event_id` of
            an earlier subscription) to resume after.
        session: an aiohttp session to connect with; the subscription makes (and closes) its own
            when none is given.
        dedupe_window: how many message ids are remembered to drop duplicates (0: none).
        initial_delay: the ceiling of the first reconnect delay, in seconds; also the jitter of
            a prompt reconnect.
        max_delay: the largest ceiling of a reconnect delay.
        receive_timeout: reconnect when nothing arrives for this long (SSE: set it above the
            server's heartbeat, 15 s by default; websocket: pings are sent after half of it
            without data). ``None``: wait forever.
        on_status: called (and awaited, when it returns an awaitable) with each
            :class:`Subscribed`, :class:`Dropped` and :class:`Reconnecting` notice.
        rng: uniform random numbers in ``[0, 1)`` for the jitter (tests pass their own).
        sleep: waits between connections (tests pass their own).

    Returns:
        The :class:`Subscription`: iterate it for :class:`Message` objects.
    """
    return Subscription(
        base_url,
        topic,
        token=token,
        transport=transport,
        last_event_id=last_event_id,
        session=session,
        dedupe_window=dedupe_window,
        initial_delay=initial_delay,
        max_delay=max_delay,
        receive_timeout=receive_timeout,
        on_status=on_status,
        rng=rng,
        sleep=sleep,
    )


__all__ = ["Backoff", "Dedupe", "Subscription", "retry_after", "subscribe"]
