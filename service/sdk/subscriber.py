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
import email.utils
import inspect
import json
import random
import re
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal, Protocol
from urllib.parse import quote

import aiohttp

from .errors import PolicyViolation, ProtocolError, refusal
from .messages import Message, Reconnecting, Status, Subscribed, decode_frame
from .sse import ParseError, SSEParser

Transport = Literal["websocket", "sse"]
Token = str | Callable[[], str | Awaitable[str]]
StatusCallback = Callable[[Status], Awaitable[None] | None]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CONNECT_TIMEOUT = 30.0  # seconds for a connection's handshake, up to its first byte of stream
_MAX_ERROR_BODY = 64 * 1024


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


class _Ended(Exception):
    """The connection ended or could not be made; the subscriber connects again.

    ``normal``: a prompt reconnect (True), a backoff (False), or prompt only when the connection
    delivered a message (None: an SSE stream that ended without saying why).
    """

    def __init__(
        self, reason: str, *, normal: bool | None = False, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.normal = normal
        self.retry_after = retry_after


class _Connection(Protocol):
    async def receive(self) -> str:
        """The next frame's JSON text. Raises _Ended, or a SubscribeError."""
        ...

    async def close(self) -> None: ...


class _WebSocket:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws

    async def receive(self) -> str:
        while True:
            msg = await self._ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT:
                return str(msg.data)
            if msg.type is aiohttp.WSMsgType.BINARY:
                return bytes(msg.data).decode("utf-8", errors="replace")
            if msg.type is aiohttp.WSMsgType.CLOSE:
                code, reason = int(msg.data), str(msg.extra or "")
                if code == CLOSE_POLICY_VIOLATION:
                    raise PolicyViolation(reason or "policy violation", code=code)
                normal = code in (CLOSE_NORMAL, CLOSE_GOING_AWAY)
                raise _Ended(f"closed with {code} {reason}".rstrip(), normal=normal)
            if msg.type is aiohttp.WSMsgType.ERROR:
                raise _Ended(f"websocket error: {msg.data!r}")
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise _Ended(f"connection lost (close code {self._ws.close_code})")

    async def close(self) -> None:
        await self._ws.close()


class _EventStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._parser = SSEParser()
        self._ready: deque[str] = deque()

    async def receive(self) -> str:
        while not self._ready:
            try:
                chunk = await self._response.content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise _Ended(f"connection lost: {exc!r}") from exc
            if not chunk:
                raise _Ended("the server ended the stream", normal=None)
            try:
                events = self._parser.feed(chunk)
            except ParseError as exc:
                raise ProtocolError(str(exc)) from exc
            self._ready.extend(event.data for event in events if event.event == "message")
        return self._ready.popleft()

    async def close(self) -> None:
        self._response.close()


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
        self._connection: _Connection | None = None
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
            except _Ended as ended:
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
                raise _Ended("closed")
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

    async def _open(self) -> _Connection:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers: dict[str, str] = {}
        token = await self._current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if self.transport == "websocket":
                    return await self._open_websocket(self._session, headers)
                return await self._open_event_stream(self._session, headers)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise _Ended(f"could not connect: {exc!r}") from exc

    async def _open_websocket(
        self, session: aiohttp.ClientSession, headers: dict[str, str]
    ) -> _Connection:
        params = {"lastEventId": self._last_event_id} if self._last_event_id else {}
        heartbeat = self._receive_timeout / 2 if self._receive_timeout else None
        try:
            ws = await session.ws_connect(
                self.url,
                headers=headers,
                params=params,
                heartbeat=heartbeat,
                max_msg_size=0,  # the server bounds its frames; a coalesced one may be large
            )
        except aiohttp.WSServerHandshakeError as exc:
            # aiohttp does not keep a refused handshake's body: the message comes from the
            # status and the WWW-Authenticate challenge.
            exc_headers: Mapping[str, str] = exc.headers or {}
            raise _refused(exc.status, exc_headers, _challenge(exc_headers)) from exc
        return _WebSocket(ws)

    async def _open_event_stream(
        self, session: aiohttp.ClientSession, headers: dict[str, str]
    ) -> _Connection:
        headers |= {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self._last_event_id:
            headers["Last-Event-ID"] = self._last_event_id
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self._receive_timeout)
        response = await session.get(self.url, headers=headers, timeout=timeout)
        if response.status != 200:
            try:
                body = await response.content.read(_MAX_ERROR_BODY)
            except (aiohttp.ClientError, OSError, TimeoutError):
                body = b""
            finally:
                response.release()
            raise _refused(response.status, response.headers, _json_message(body))
        if response.content_type != "text/event-stream":
            response.close()
            raise ProtocolError(
                f"{self.url} answered {response.content_type!r}, not an event stream",
                status=response.status,
            )
        return _EventStream(response)

    async def _current_token(self) -> str | None:
        if self._token is None or isinstance(self._token, str):
            return self._token
        token = self._token()
        return await token if inspect.isawaitable(token) else token

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    async def _pause(self, ended: _Ended) -> None:
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


def _refused(status: int, headers: Mapping[str, str], message: str | None) -> Exception:
    """What a handshake answered ``status`` means: an _Ended to retry, or the error to raise."""
    if status == 429 or status >= 500:
        return _Ended(f"answered {status}", retry_after=retry_after(headers))
    if 400 <= status < 500:
        return refusal(status, message)
    return ProtocolError(f"answered {status} {message or ''}".rstrip(), status=status)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (a number or an HTTP date), if any."""
    value = (headers.get("Retry-After") or "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


_CHALLENGE_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def _challenge(headers: Mapping[str, str]) -> str | None:
    """The message of a ``WWW-Authenticate`` challenge (RFC 6750), if it has one."""
    params = {
        key: re.sub(r"\\(.)", r"\1", value)
        for key, value in _CHALLENGE_PARAM.findall(headers.get("WWW-Authenticate", ""))
    }
    if "error_description" in params:
        return params["error_description"]
    if "scope" in params:
        return f"{params.get('error', 'insufficient_scope')}: needs {params['scope']}"
    return params.get("error")


def _json_message(body: bytes) -> str | None:
    """The ``message`` of loopgate's JSON error body, if it is one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, TypeError, KeyError):
        return None
    return message if isinstance(message, str) else None


__all__ = ["Backoff", "Dedupe", "Subscription", "retry_after", "subscribe"]
