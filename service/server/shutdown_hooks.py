"""What a server's shutdown hook is given: the stream connections' gate, as a protocol.

Each supported server learns of its shutdown differently. A server's ``watch_shutdown(gate)``
makes sure that, as soon as that server's shutdown begins, ``gate.close(why)`` runs on the
worker's loop, and, when the server would otherwise close stream connections itself straight
away (with its own close code), holds the server back until ``await gate.drained(timeout)``
says they are gone or the time is up. It returns a function that undoes what it installed.
"""

from __future__ import annotations

from typing import Protocol


class ShutdownGate(Protocol):
    def close(self, why: str) -> None:
        """Begin closing every stream connection (websockets with 1001, SSE streams ended)."""

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no stream connection is open; whether none is."""
        ...
