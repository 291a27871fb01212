"""FastAPI with one threaded Pub/Sub client made in the lifespan: what a FastAPI user writes.

Each uvicorn worker makes its ``PublisherClient`` at startup (after the worker started, so gRPC is
never shared across processes); the handler validates the body with a pydantic model, publishes
each message and awaits each future through ``asyncio.wrap_future``, so the event loop never blocks
on the client's batching thread::

    uvicorn --workers 2 --loop uvloop --http httptools --no-access-log bench.apps.fastapi_peer:app
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from google.cloud import pubsub_v1
from pydantic import BaseModel

from .common import topic_path


class Message(BaseModel):
    data: str


class PublishRequest(BaseModel):
    messages: list[Message]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.publisher = pubsub_v1.PublisherClient()
    yield
    app.state.publisher.stop()


app = FastAPI(lifespan=lifespan)


@app.post("/v1/topics/{topic}:publish")
async def publish(topic: str, body: PublishRequest, request: Request) -> dict[str, list[str]]:
    """Publish the request's messages and wait for their ids."""
    publisher: pubsub_v1.PublisherClient = request.app.state.publisher
    futures = [
        publisher.publish(topic_path(topic), base64.b64decode(message.data))
        for message in body.messages
    ]
    return {"messageIds": [await asyncio.wrap_future(future) for future in futures]}
