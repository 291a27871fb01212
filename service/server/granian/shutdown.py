"""How the stream connections' gate learns that Granian is shutting down (not yet implemented)."""

from __future__ import annotations

from collections.abc import Callable

from ..shutdown_hooks import ShutdownGate


def watch_shutdown(gate: ShutdownGate) -> Callable[[], None]:
    """Close ``gate`` as soon as Granian's shutdown begins; returns what undoes it."""
    del gate
    return _nothing


def _nothing() -> None:
    pass
