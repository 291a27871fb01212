"""An incremental Server-Sent Events parser (the WHATWG ``text/event-stream`` rules).

Lines end with CRLF, LF or CR (a CRLF may be split between two chunks); ``:`` starts a comment
(loopgate's heartbeats); ``data`` lines of one event are joined with newlines; ``id`` persists
from event to event; a blank line dispatches the event, and an event without data is not
dispatched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched event."""

    data: str
    event: str = "message"
    id: str = ""  # the last event id in force when it was dispatched


class ParseError(ValueError):
    """A line longer than the parser's limit."""


class SSEParser:
    """Feed it the bytes of a stream as they come; it returns the events they complete.

    Args:
        max_line: the longest line accepted, in bytes (a guard against a stream without line
            ends).
    """

    def __init__(self, max_line: int = 64 * 1024 * 1024) -> None:
        self.last_event_id = ""
        self.retry: int | None = None  # the last ``retry:`` the stream sent, in milliseconds
        self._max_line = max_line
        self._rest = b""
        self._skip_lf = False  # the last chunk ended with CR: a LF first in the next is its pair
        self._first = True
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[Event]:
        """The events that ``chunk`` completes."""
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        if not chunk:
            return []
        *lines, rest = _LINE_END.split(self._rest + chunk)
        self._skip_lf = chunk.endswith(b"\r")
        if len(rest) > self._max_line:
            raise ParseError(f"an event-stream line longer than {self._max_line} bytes")
        self._rest = rest
        events: list[Event] = []
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if self._first:
                self._first = False
                line = line.removeprefix("\ufeff")
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        if not data:
            return None
        return Event("\n".join(data), event or "message", self.last_event_id)
