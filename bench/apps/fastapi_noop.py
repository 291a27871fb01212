"""FastAPI on uvicorn answering the publish call without publishing: the ceiling for that stack.

It reads the body and answers a fixed id, like ``quart_noop`` does on Hypercorn, so it measures
what uvicorn and FastAPI alone cost per request::

    uvicorn --workers 2 --loop uvloop --http httptools --no-access-log bench.apps.fastapi_noop:app
"""

from __future__ import annotations

from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/v1/topics/{topic}:publish")
async def publish(topic: str, request: Request) -> dict[str, list[str]]:
    """Read the request and answer as if its one message were published."""
    await request.body()
    return {"messageIds": ["0"]}
