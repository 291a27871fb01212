"""Websocket compression (permessage-deflate), off unless ``LOOPGATE_STREAM_COMPRESSION`` is on.

Hypercorn accepts permessage-deflate from every client that offers it, and every browser does;
it has no setting to refuse it. For a fan-out that is costly: each compressing connection keeps a
zlib state of its own, and every frame is compressed once per connection, which undoes the frame
text shared by all of them; the messages are small JSON texts that compress little. With 1,000
clients offering compression (``python -m bench.stream --clients 1000 --modes pubsub --idle 0
--offer-compression``), the worker held 34 KiB per connection declining it and 125 KiB with
``--compression``, and the clients' p99 rose from 156 to 443 ms.

Hypercorn builds its list of supported extensions from ``PerMessageDeflate`` in
``hypercorn.protocol.ws_stream`` at every handshake; :func:`set_compression` puts a version there
that declines every offer (wsproto then answers without the extension, and the connection is
uncompressed), or puts wsproto's own back. The test suite checks the handshake against a real
Hypercorn both ways, so a Hypercorn that builds its handshake differently fails it.
"""

from __future__ import annotations

import logging

from wsproto.extensions import PerMessageDeflate

log = logging.getLogger("loopgate.websocket")


class DeclinedDeflate(PerMessageDeflate):
    """permessage-deflate that declines every offer: the connection goes uncompressed."""

    def accept(self, offer: str) -> None:
        return None


def set_compression(allowed: bool) -> None:
    """Let Hypercorn's websocket handshakes accept permessage-deflate, or decline it."""
    try:
        from hypercorn.protocol import ws_stream
    except ImportError:  # served by another ASGI server: its own settings apply
        return
    if not hasattr(ws_stream, "PerMessageDeflate"):
        log.warning("this Hypercorn negotiates websocket compression in a way loopgate cannot set")
        return
    ws_stream.PerMessageDeflate = PerMessageDeflate if allowed else DeclinedDeflate
