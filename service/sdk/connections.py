"""The connections of a :class:`~service.sdk.subscriber.Subscription`: a websocket or an SSE
stream of a loopgate topic, each handing out its frames' JSON text, and what a refused handshake
means (an :class:`Ended` to retry after, or the error to raise).
"""

from __future__ import annotations

import email.utils
import json
import re
from collections import deque
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Protocol

import aiohttp

from .errors import PolicyViolation, ProtocolError, refusal
from .sse import ParseError, SSEParser

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
_MAX_ERROR_BODY = 64 * 1024


class Ended(Exception):
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


class Connection(Protocol):
    async def receive(self) -> str:
        """The next frame's JSON text. Raises Ended, or a SubscribeError."""
        ...

    async def close(self) -> None: ...


class _WebSocket:
    """A websocket stream's frames."""

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
                raise Ended(f"closed with {code} {reason}".rstrip(), normal=normal)
            if msg.type is aiohttp.WSMsgType.ERROR:
                raise Ended(f"websocket error: {msg.data!r}")
            if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                raise Ended(f"connection lost (close code {self._ws.close_code})")

    async def close(self) -> None:
        await self._ws.close()


class _EventStream:
    """An SSE stream's message events."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._parser = SSEParser()
        self._ready: deque[str] = deque()

    async def receive(self) -> str:
        while not self._ready:
            try:
                chunk = await self._response.content.readany()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise Ended(f"connection lost: {exc!r}") from exc
            if not chunk:
                raise Ended("the server ended the stream", normal=None)
            try:
                events = self._parser.feed(chunk)
            except ParseError as exc:
                raise ProtocolError(str(exc)) from exc
            self._ready.extend(event.data for event in events if event.event == "message")
        return self._ready.popleft()

    async def close(self) -> None:
        self._response.close()


async def open_websocket(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    last_event_id: str | None,
    receive_timeout: float | None,
) -> Connection:
    """A websocket of the stream at ``url``, resuming after ``last_event_id``; pings after
    half of ``receive_timeout`` without data."""
    params = {"lastEventId": last_event_id} if last_event_id else {}
    heartbeat = receive_timeout / 2 if receive_timeout else None
    try:
        ws = await session.ws_connect(
            url,
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


async def open_event_stream(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    last_event_id: str | None,
    receive_timeout: float | None,
) -> Connection:
    """An SSE stream at ``url``, resuming after ``last_event_id``; a read waits at most
    ``receive_timeout``."""
    headers |= {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    timeout = aiohttp.ClientTimeout(total=None, sock_read=receive_timeout)
    response = await session.get(url, headers=headers, timeout=timeout)
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
            f"{url} answered {response.content_type!r}, not an event stream",
            status=response.status,
        )
    return _EventStream(response)


def _refused(status: int, headers: Mapping[str, str], message: str | None) -> Exception:
    """What a handshake answered ``status`` means: an Ended to retry, or the error to raise."""
    if status == 429 or status >= 500:
        return Ended(f"answered {status}", retry_after=retry_after(headers))
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
