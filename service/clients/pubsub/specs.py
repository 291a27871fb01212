"""Pub/Sub clients on grpc.aio: a batching publisher and an async subscriber (admin calls).

Both use the loop's own gRPC channel; ``PUBSUB_EMULATOR_HOST`` switches them to an insecure channel
to the emulator.
"""

from __future__ import annotations

import os
from typing import Any

import grpc
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
    PublisherGrpcAsyncIOTransport,
)
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
    SubscriberGrpcAsyncIOTransport,
)

from ...config import current_settings
from ...loopclients import ClientSpec
from ..credentials import RefreshingCredentials
from .publisher import BatchSettings, Publisher

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Reconnect quickly after a backend outage (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
DEFAULT_ENDPOINT = "pubsub.googleapis.com:443"


def emulator_host() -> str | None:
    return os.environ.get("PUBSUB_EMULATOR_HOST") or None


async def _channel(transport: Any) -> grpc.aio.Channel:
    """An insecure channel to the emulator, or an authenticated one to Pub/Sub."""
    host = emulator_host()
    if host:
        return grpc.aio.insecure_channel(host, options=CHANNEL_OPTIONS)
    credentials = await CREDENTIALS.get()
    channel: grpc.aio.Channel = transport.create_channel(
        DEFAULT_ENDPOINT, credentials=credentials.credentials, options=CHANNEL_OPTIONS
    )
    return channel


async def _wait_ready(channel: grpc.aio.Channel) -> None:
    await channel.channel_ready()


async def create_publisher() -> Publisher:
    settings = current_settings()
    transport = PublisherGrpcAsyncIOTransport(channel=await _channel(PublisherGrpcAsyncIOTransport))
    client = PublisherAsyncClient(transport=transport)
    try:
        await _wait_ready(transport.grpc_channel)
    except BaseException:
        await transport.close()  # type: ignore[no-untyped-call]  # unannotated in the generated client
        raise
    return Publisher(
        client,
        BatchSettings(
            max_messages=settings.publish_max_messages,
            max_bytes=settings.publish_max_bytes,
            max_latency=settings.publish_max_latency,
            max_in_flight=settings.publish_max_in_flight,
            timeout=settings.publish_timeout,
            max_pending_messages=settings.publish_max_pending_messages,
            max_pending_bytes=settings.publish_max_pending_bytes,
        ),
    )


async def close_publisher(publisher: Publisher) -> None:
    await publisher.aclose()


async def check_publisher(publisher: Publisher) -> None:
    await _wait_ready(publisher.client.transport.grpc_channel)  # type: ignore[attr-defined]  # typed as the abstract transport


async def create_subscriber() -> SubscriberAsyncClient:
    transport = SubscriberGrpcAsyncIOTransport(
        channel=await _channel(SubscriberGrpcAsyncIOTransport)
    )
    try:
        await _wait_ready(transport.grpc_channel)
    except BaseException:
        await transport.close()  # type: ignore[no-untyped-call]  # unannotated in the generated client
        raise
    return SubscriberAsyncClient(transport=transport)


async def close_subscriber(subscriber: SubscriberAsyncClient) -> None:
    await subscriber.transport.close()  # type: ignore[no-untyped-call]  # unannotated in the generated client


async def check_subscriber(subscriber: SubscriberAsyncClient) -> None:
    await _wait_ready(subscriber.transport.grpc_channel)  # type: ignore[attr-defined]  # typed as the abstract transport


async def _close_credentials(credentials: RefreshingCredentials) -> None:
    await credentials.aclose()


CREDENTIALS: ClientSpec[RefreshingCredentials] = ClientSpec(
    "credentials", create=RefreshingCredentials.create, close=_close_credentials, eager=False
)
PUBLISHER: ClientSpec[Publisher] = ClientSpec(
    "publisher", create=create_publisher, close=close_publisher, check=check_publisher
)
SUBSCRIBER: ClientSpec[SubscriberAsyncClient] = ClientSpec(
    "subscriber", create=create_subscriber, close=close_subscriber, check=check_subscriber
)

__all__ = ["CREDENTIALS", "PUBLISHER", "SUBSCRIBER"]
