"""What loopgate changes in Granian: nothing in the process; its limits are flags.

Granian's HTTP and websockets run in Rust (hyper, tungstenite), out of reach of Python, so its
limits are the production flags of devtools/servers.py:

* the request head: ``--http1-buffer-size 16384`` (hyper answers 431 above it, and above 100
  headers) and ``--http2-max-headers-size 16384``;
* idle connections: ``--http1-header-read-timeout`` (at most 60 s) closes a keep-alive
  connection whose next head does not come, and a head sent too slowly;
* connections served at once: ``--backpressure``, above the stream gate's own bound;
* request bodies are read as the app asks for them (an upload over its limit is refused before
  its body is sent); the publish body limit is Quart's, as under every server.

What Granian does not offer, and the tests mark as such: a websocket message limit (tungstenite's
64 MiB a message applies: no 1009 for a 256 KiB frame), websocket compression (never negotiated,
whatever ``LOOPGATE_STREAM_COMPRESSION`` says), a timeout for a connection that never sends a
byte, and a refused websocket handshake's status (it takes the refusal's body in one message
only; Quart sends it in several, so the client gets 403). Its own access log has no size and no
request id: loopgate writes the access log instead (:class:`service.logs.AccessLog`).
"""

from __future__ import annotations

from ...config import Settings


def install(settings: Settings) -> None:
    """Adapt Granian (once per process, however often it is called): nothing to change."""
    del settings
