"""The built-in clients and their accessors.

Each accessor returns the running event loop's instance, creating it on first use::

    publisher = await get_publisher()
"""

from __future__ import annotations

from typing import Any

import aiohttp
from google.pubsub_v1 import SubscriberAsyncClient

from ..loopclients import ClientSpec
from .http_session import HTTP
from .pubsub.publisher import Publisher
from .pubsub.specs import CREDENTIALS, PUBLISHER, SUBSCRIBER
from .storage.client import STORAGE, StorageClient


def builtin_clients() -> list[ClientSpec[Any]]:
    """The clients every app declares, in startup order."""
    return [HTTP, PUBLISHER, SUBSCRIBER, CREDENTIALS, STORAGE]


async def get_publisher() -> Publisher:
    """The loop's batching Pub/Sub publisher."""
    return await PUBLISHER.get()


async def get_subscriber() -> SubscriberAsyncClient:
    """The loop's Pub/Sub subscriber client (grpc.aio)."""
    return await SUBSCRIBER.get()


async def get_storage() -> StorageClient:
    """The loop's Cloud Storage client (gcloud-aio-storage over the loop's aiohttp session)."""
    return await STORAGE.get()


async def get_http() -> aiohttp.ClientSession:
    """The loop's shared aiohttp session."""
    return await HTTP.get()


__all__ = [
    "CREDENTIALS",
    "HTTP",
    "PUBLISHER",
    "STORAGE",
    "SUBSCRIBER",
    "builtin_clients",
    "get_http",
    "get_publisher",
    "get_storage",
    "get_subscriber",
]
