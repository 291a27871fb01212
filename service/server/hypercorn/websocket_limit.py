"""Hypercorn's websocket message limit, kept after it has been exceeded.

Hypercorn gathers a websocket message in a buffer and, when it grows past
``websocket_max_message_size``, closes the connection with 1009. But the buffer is not dropped:
while the client goes on sending (it need not answer the close), each further frame is appended
to it before the size is checked again, so one connection can grow the worker without bound. Seen
with ``python -m bench.fuzz_ws``: twenty clients sending frames over the limit held 1.3 GiB of a
worker. :func:`keep_limit` makes the buffer drop what it holds once the limit is exceeded and
refuse everything after it (the connection is closing with 1009 anyway). Hypercorn's
``WebsocketBuffer`` in ``hypercorn.protocol.ws_stream`` (0.17 and 0.18) is the internal patched
here; the test suite checks its shape and the bound against a real Hypercorn.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loopgate.server")

_MARK = "_loopgate_bounded"


def keep_limit() -> None:
    """Patch Hypercorn's websocket buffer once per process (a no-op under other servers)."""
    try:
        from hypercorn.protocol import ws_stream
    except ImportError:  # served by another ASGI server
        return
    buffer = getattr(ws_stream, "WebsocketBuffer", None)
    too_large = getattr(ws_stream, "FrameTooLargeError", None)
    original = getattr(buffer, "extend", None)
    if buffer is None or too_large is None or original is None:
        log.warning("this Hypercorn buffers websocket messages in a way loopgate cannot bound")
        return
    if getattr(original, _MARK, False):
        return

    def extend(self: Any, event: Any) -> None:
        if self.length > self.max_length:  # refused already: keep nothing more
            raise too_large()
        try:
            original(self, event)
        except too_large:
            self.value = None  # what was gathered is dropped; ``length`` stays over the limit
            raise

    setattr(extend, _MARK, True)
    buffer.extend = extend
