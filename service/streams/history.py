"""A topic's recent history in one worker: what a subscriber reconnecting to the same worker is
replayed, with no Pub/Sub call.

The feed (:mod:`service.streams.feed`) adds every frame it hands to its subscribers (or, with
none connected, acks) in that order; the history keeps the same :class:`Frame` objects, so it
costs a reference per message, bounded by ``LOOPGATE_STREAM_HISTORY_MESSAGES``, ``..._BYTES``
(the frames' text) and ``..._SECONDS``.

:attr:`History.complete_since` is the publish time from which every message is either in the
history or still to come from the worker's subscription: the subscription's creation (plus
:data:`CLOCK_SKEW`, Pub/Sub's clock against ours), later the publish time of the last frame
forgotten. A subscription made again (it was deleted) starts the history afresh.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from itertools import islice

from ..config import Settings
from .cursor import Cursor
from .frames import Frame

CLOCK_SKEW = 1.0  # seconds Pub/Sub's publish times may be behind this host's clock


class History:
    """The recent frames of one topic in this worker, in the order they were handed over."""

    def __init__(self, settings: Settings) -> None:
        self.max_messages = settings.stream_history_messages
        self.max_bytes = settings.stream_history_bytes
        self.max_age = settings.stream_history_seconds
        # Seconds before a cursor's publish time from which a resume by time replays
        # (LOOPGATE_STREAM_RESUME_SLACK): Pub/Sub delivers out of publish order, so the
        # subscriber's old worker may have sent it a message before older ones it had not
        # received yet. These come again: duplicates, with their original messageId.
        self.slack = settings.stream_resume_slack
        self._loop = asyncio.get_running_loop()
        self._frames: deque[tuple[float, Frame]] = deque()  # (arrival, loop clock), frame
        self._first = 0  # the sequence number of _frames[0]
        self._seq_of: dict[str, int] = {}  # message id -> sequence number
        self._bytes = 0
        self.complete_since = float("inf")  # nothing is complete before the subscription exists

    def __len__(self) -> int:
        return len(self._frames)

    def restart(self, since: float | None = None) -> None:
        """Forget every frame: the subscription was (re)created; complete from ``since``
        (default: now plus :data:`CLOCK_SKEW`)."""
        self._first += len(self._frames)
        self._frames.clear()
        self._seq_of.clear()
        self._bytes = 0
        self.complete_since = time.time() + CLOCK_SKEW if since is None else since

    def extend(self, frames: list[Frame]) -> None:
        """Remember ``frames``, handed over now, forgetting the oldest beyond the bounds."""
        if not self.max_messages or not self.max_bytes or not self.max_age:
            if frames:
                self._forget_through(max(frame.published for frame in frames))
            return
        now = self._loop.time()
        seq = self._first + len(self._frames)
        for frame in frames:
            self._frames.append((now, frame))
            self._seq_of[frame.message_id] = seq
            self._bytes += len(frame.text)
            seq += 1
        self._trim(now)

    def after(self, cursor: Cursor) -> list[Frame] | None:
        """What a subscriber that stopped at ``cursor`` has missed, or ``None`` when the
        history does not reach back that far.

        The cursor's message in the history: every frame after it (the subscriber was handed
        the same frames in the same order). Otherwise, when the history is complete from
        :attr:`slack` before the cursor's publish time: every frame published since
        then.
        """
        self._trim(self._loop.time())
        seq = self._seq_of.get(cursor.message_id) if cursor.message_id else None
        if seq is not None:
            return [frame for _, frame in islice(self._frames, seq - self._first + 1, None)]
        since = cursor.published - self.slack
        if since < self.complete_since:
            return None
        return self.since(since)

    def since(self, published: float) -> list[Frame]:
        """The frames published at or after ``published`` (seconds since the epoch)."""
        return [frame for _, frame in self._frames if frame.published >= published]

    def _trim(self, now: float) -> None:
        frames = self._frames
        oldest = now - self.max_age
        while frames and (
            len(frames) > self.max_messages or self._bytes > self.max_bytes or frames[0][0] < oldest
        ):
            _, frame = frames.popleft()
            self._bytes -= len(frame.text)
            if self._seq_of.get(frame.message_id) == self._first:
                del self._seq_of[frame.message_id]
            self._first += 1
            self._forget_through(frame.published)

    def _forget_through(self, published: float) -> None:
        # A forgotten frame's message may have been published after others still here: the
        # history is complete only after the latest forgotten one.
        if published + 1e-6 > self.complete_since:
            self.complete_since = published + 1e-6
