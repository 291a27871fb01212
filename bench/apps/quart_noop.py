"""Quart on Hypercorn answering the publish call without publishing: the ceiling.

It reads the body and answers a fixed id, so it measures what the server and the framework
alone cost per request::

    hypercorn --config hypercorn.toml --workers 2 bench.apps.quart_noop:app
"""

from __future__ import annotations

from quart import Quart, request

app = Quart(__name__)


@app.post("/v1/topics/<topic>:publish")
async def publish(topic: str) -> dict[str, list[str]]:
    """Read the request and answer as if its one message were published."""
    await request.get_data()
    return {"messageIds": ["0"]}
