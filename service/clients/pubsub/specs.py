"""Pub/Sub clients on grpc.aio: a batching publisher and an async subscriber (admin calls).

Both use the loop's own gRPC channel; ``PUBSUB_EMULATOR_HOST`` switches them to an insecure channel
to the emulator.

Readiness (the ``check`` of each spec, run by ``/readyz``): a channel's connectivity state says
nothing about a backend that accepts connections but does not answer (a hung process, a black-holed
connection): the channel stays ``READY`` while every call hangs. So each check makes one cheap real
call on the client's own channel, with a deadline of ``LOOPGATE_READY_TIMEOUT`` and no retries:
``ListTopics`` for the publisher, ``ListSubscriptions`` for the subscriber, both with a page size of
one and needing only the project (no topic has to be configured). They are admin operations, limited
per minute per project; ``/readyz`` reuses a check's outcome for ``LOOPGATE_READY_INTERVAL`` (see
``routes/health.py``), so a worker makes at most one of each per interval, whatever the probe rate.
An answer that refuses the call itself still proves Pub/Sub answers: ``PERMISSION_DENIED`` (a
service account with ``roles/pubsub.publisher`` alone may not list) and ``RESOURCE_EXHAUSTED`` (the
admin quota, which publishes do not use) count as ready.

The publisher adds its own evidence, which costs no call: a publish call that has waited for Pub/Sub
longer than ``LOOPGATE_READY_PUBLISH_STALL`` (retries included) makes it not ready, even while admin
calls are answered.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.api_core import exceptions as gexc
from google.pubsub_v1 import PublisherAsyncClient, SubscriberAsyncClient
from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
    PublisherGrpcAsyncIOTransport,
)
from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
    SubscriberGrpcAsyncIOTransport,
)

from ...config import Settings, current_settings
from ...errors import BackendError
from ...loopclients import ClientSpec
from ..credentials import RefreshingCredentials
from .batches import BatchSettings
from .errors import BACKEND, translate
from .publisher import Publisher

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
# Refusals of a readiness call that still prove Pub/Sub answers, and that publishes do not share.
ANSWERED = (gexc.PermissionDenied, gexc.ResourceExhausted)


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


async def _answers(call: Callable[..., Awaitable[object]], name: str, settings: Settings) -> None:
    """Make one readiness call (``name``, for messages): first page, page size one, no retries.

    Raises:
        BackendError: Pub/Sub did not answer within ``ready_timeout``, or answered an error.
    """
    timeout = settings.ready_timeout
    try:
        await call(
            request={"project": f"projects/{settings.project}", "page_size": 1},
            retry=None,
            timeout=timeout,
        )
    except ANSWERED:
        return
    except gexc.DeadlineExceeded as exc:
        raise BackendError(BACKEND, f"{name} was not answered within {timeout:g}s") from exc
    except gexc.GoogleAPICallError as exc:
        raise translate(exc, operation=name) from exc


async def check_publisher(publisher: Publisher) -> None:
    """Ready when no publish call has waited longer than ``ready_publish_stall`` and Pub/Sub
    answers a ``ListTopics`` on the publisher's channel."""
    settings = current_settings()
    waited = publisher.oldest_call_age()
    if waited > settings.ready_publish_stall:
        raise BackendError(
            BACKEND,
            f"a publish call has waited {waited:.1f}s for an answer "
            f"(LOOPGATE_READY_PUBLISH_STALL is {settings.ready_publish_stall:g}s)",
        )
    await _answers(publisher.client.list_topics, "ListTopics", settings)


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
    """Ready when Pub/Sub answers a ``ListSubscriptions`` on the subscriber's channel."""
    await _answers(subscriber.list_subscriptions, "ListSubscriptions", current_settings())


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
