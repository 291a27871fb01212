"""Hypercorn: what loopgate adapts in it.

* :mod:`.deflate`: websocket compression declined unless enabled;
* :mod:`.close`: at shutdown, connections whose clients read nothing are reset, so a worker always
  exits;
* :mod:`.websocket_limit`: a websocket message over the size limit stops being buffered once it
  has been refused;
* :mod:`.half_close`: an idle connection closed at once when its client closes it;
* :mod:`.access_log`: access lines that compute only the atoms they read (Hypercorn's copy every
  header and environment variable for each line);
* :mod:`.shutdown`: the stop event a Hypercorn master hands its workers, which the stream
  connections' gate polls (:func:`watch_shutdown` has nothing more to do).
"""

from __future__ import annotations

from collections.abc import Callable

from quart import Quart

from ...config import Settings
from ..shutdown_hooks import ShutdownGate
from . import access_log, close, deflate, half_close, websocket_limit

__all__ = ["install", "watch_shutdown"]


def install(app: Quart, settings: Settings) -> None:
    """Adapt Hypercorn (once per process, however often it is called); Hypercorn writes its own
    access log (hypercorn.toml), so ``app`` is left as it is."""
    del app
    deflate.set_compression(settings.stream_compression)
    close.bound_close()
    websocket_limit.keep_limit()
    half_close.close_when_read_ends()
    access_log.use_lean_atoms()


def watch_shutdown(gate: ShutdownGate) -> Callable[[], None]:
    """Nothing to add: the gate polls the master's stop event (:mod:`.shutdown`) itself."""
    del gate
    return _nothing


def _nothing() -> None:
    pass
