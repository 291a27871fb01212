"""The stop event a Hypercorn master hands each of its workers.

Hypercorn runs an app's lifespan shutdown only after every connection is gone (or its graceful
timeout cancelled them), so ``app.shutdown_event`` comes too late to close websockets and SSE
streams cleanly. A Hypercorn worker (``workers >= 1``) is told to stop through a multiprocessing
event that its master sets on SIGTERM/SIGINT; :class:`~service.streams.gate.ConnectionGate` polls
that same event, as Hypercorn does.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


def server_shutdown_event() -> Any:
    """The master's shutdown event of this Hypercorn worker process, or ``None``."""
    # Hypercorn starts each worker as a multiprocessing child whose target receives the master's
    # shutdown event as the keyword argument ``shutdown_event``; the child keeps its Process object.
    kwargs = getattr(multiprocessing.current_process(), "_kwargs", None) or {}
    event = kwargs.get("shutdown_event")
    return event if callable(getattr(event, "is_set", None)) else None
