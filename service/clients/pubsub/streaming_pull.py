"""Streaming pull: Pub/Sub's threaded ``SubscriberClient`` bridged into the event loop.

Why the threaded client and not the generated ``SubscriberAsyncClient.streaming_pull``: the
generated async client is only the bare bidirectional RPC. Everything that makes a streaming pull
dependable lives in the threaded client: lease management (modify-ack-deadline while a message is
held, up to ``max_lease_duration``), flow control (at most ``max_messages`` outstanding), batched
acks, and resuming the stream after retryable errors and server-side stream closes. Rewriting that on
grpc.aio would be a few hundred lines of subtle code for no gain (and on a busy loop grpc.aio is
slower: each response takes several turns of the loop to reach the code, where the threaded client's
batch takes one). Its callback runs in a thread and only appends to a list and, once per batch,
wakes the loop with ``call_soon_threadsafe``, which costs about a microsecond per message. Each
:class:`StreamingPull` uses a one-thread executor for its callbacks (the callback does almost
nothing), or with ``inline=True`` runs them in the client's stream thread, plus the client's own
stream, lease and dispatch threads.

:class:`StreamingPull` supervises one subscription: when the stream ends with a non-retryable error
(the subscription or its topic was deleted, an emulator restarted) it calls ``prepare`` (which may
recreate the subscription) and starts again with bounded backoff, until it is stopped.

Ending a stream: the client library ends its stream by cancelling the RPC. Pub/Sub learns of a
cancelled stream only some time later (the emulator may go on handing messages to it for minutes),
and a message it hands to a stream that is gone is lost to everyone until that stream's ack
deadline passes. :meth:`StreamingPull.stop` with ``drain`` therefore first ends the stream the way
gRPC means it to: it closes the request side and reads on until Pub/Sub ends the response side.
Every message sent on the stream before its end reaches this process, where the caller settles it;
only then are the client's threads stopped. Closing the request side needs two private attributes
of the client library (the request queue of its stream and its consumer thread); without them, or
when Pub/Sub does not end the stream within ``drain`` seconds, the stream is cancelled as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.cloud import pubsub_v1
from google.cloud.pubsub_v1.subscriber._protocol.streaming_pull_manager import (
    StreamingPullManager,
)
from google.cloud.pubsub_v1.subscriber.futures import StreamingPullFuture
from google.cloud.pubsub_v1.subscriber.message import Message
from google.cloud.pubsub_v1.subscriber.scheduler import Scheduler, ThreadScheduler
from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

from ...loopclients import ClientSpec
from .specs import CHANNEL_OPTIONS, CREDENTIALS, emulator_host

log = logging.getLogger("loopgate.streaming")

RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


class InlineScheduler(Scheduler):  # type: ignore[misc]  # google.cloud.pubsub_v1 is untyped
    """Runs the subscriber's callback in the client's own thread, as each message is released.

    For a callback that only hands the message over (as :meth:`StreamingPull._callback` does), a
    thread pool adds a thread hop per message, and each hop waits for the GIL that a busy event
    loop holds: under load that adds tens of milliseconds to every batch.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()

    @property
    def queue(self) -> queue.Queue[Any]:
        return self._queue

    def schedule(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        callback(*args, **kwargs)

    def shutdown(self, await_msg_callbacks: bool = False) -> list[Message]:
        return []


class StreamingPull:
    """A supervised streaming pull whose messages reach ``on_messages`` on the event loop.

    Args:
        client: the loop's threaded ``SubscriberClient``.
        subscription: full subscription path.
        on_messages: called on the loop with every batch of messages received; it acks or nacks.
        flow_control: the client's flow control (outstanding bound and maximum lease).
        prepare: awaited before every (re)start, e.g. to (re)create the subscription; an error
            in it is retried with backoff. :meth:`stop` lets one in flight finish rather than
            cancel it: a cancelled call may still reach Pub/Sub, after the caller's own clean-up
            (a create arriving after the delete that followed ``stop`` would bring the
            subscription back).
        prepared: the caller has just done what ``prepare`` does, so the first start skips it.
        inline: hand messages over from the client's stream thread (:class:`InlineScheduler`)
            instead of a one-thread executor.
    """

    def __init__(
        self,
        client: pubsub_v1.SubscriberClient,
        subscription: str,
        on_messages: Callable[[list[Message]], None],
        flow_control: pubsub_v1.types.FlowControl,
        prepare: Callable[[], Awaitable[object]] | None = None,
        *,
        prepared: bool = False,
        inline: bool = False,
    ) -> None:
        self.client = client
        self.subscription = subscription
        self._on_messages = on_messages
        self._flow_control = flow_control
        self._prepare = prepare
        self._prepared = prepared
        self._preparing: asyncio.Task[object] | None = None
        self._inline = inline
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: list[Message] = []
        self._scheduled = False
        self._future: Any = None
        self._manager: StreamingPullManager | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.running = asyncio.Event()

    def start(self) -> None:
        self._task = self._loop.create_task(self._supervise(), name=f"pull {self.subscription}")

    async def _supervise(self) -> None:
        delay = RETRY_INITIAL
        while True:
            started = self._loop.time()
            try:
                if self._prepare is not None and not self._prepared:
                    self._preparing = self._loop.create_task(_awaited(self._prepare()))
                    await asyncio.shield(self._preparing)
                self._prepared = False
                self._future = self._subscribe()
                self.running.set()
                await asyncio.wrap_future(self._future)
                raise RuntimeError("the streaming pull ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.running.clear()
                if self._stopping:
                    return  # stop() ended the stream
                await self._cancel_future()
                log.warning(
                    "streaming pull of %s stopped (%s: %s); restarting in %.1fs",
                    self.subscription,
                    type(exc).__name__,
                    str(exc)[:200],
                    delay,
                )
            if self._loop.time() - started > 10 * RETRY_MAX:
                delay = RETRY_INITIAL  # it ran for a while: a new outage starts a new backoff
            await asyncio.sleep(delay)
            delay = min(RETRY_MAX, delay * 2)

    def _subscribe(self) -> StreamingPullFuture:
        # What SubscriberClient.subscribe does, keeping the manager so that stop() can end the
        # stream gracefully. Its shutdown waits for a callback that is running: none runs after it.
        scheduler: Scheduler
        if self._inline:
            scheduler = InlineScheduler()
        else:
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopgate-pull")
            scheduler = ThreadScheduler(executor)
        self._manager = manager = StreamingPullManager(
            self.client,
            self.subscription,
            flow_control=self._flow_control,
            scheduler=scheduler,
            await_callbacks_on_shutdown=True,
        )
        future = StreamingPullFuture(manager)
        manager.open(callback=self._callback, on_callback_error=future.set_exception)
        return future

    def _callback(self, message: Message) -> None:
        # Runs in the client's executor thread: hand over, wake the loop once per batch.
        with self._lock:
            self._pending.append(message)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: the message is redelivered elsewhere
            message.nack()

    @property
    def arrived(self) -> bool:
        """Whether messages wait in the hand-over whose wake-up has not run yet."""
        return bool(self._pending)

    def collect(self) -> list[Message]:
        """Take the messages waiting in the hand-over now, before their wake-up runs.

        The caller settles them like a batch passed to ``on_messages``; the wake-up then finds
        nothing. A loop busy writing runs its timers and its running tasks before the wake-up,
        so a consumer about to write (the fan-out) calls this not to leave them for its next round.
        """
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._scheduled = False
        if batch:
            self._on_messages(batch)

    async def _cancel_future(self) -> None:
        future, self._future = self._future, None
        if future is not None:
            # Cancelling joins the client's threads: off the loop.
            await asyncio.to_thread(_stop, future)

    async def stop(self, drain: float = 0.0) -> list[Message]:
        """Stop the stream and its supervisor.

        Args:
            drain: when positive, end the stream gracefully first (see the module docstring) and
                wait up to that many seconds for Pub/Sub to end it; every message sent on it
                before then reaches ``on_messages`` (the consumer must be ready to settle it).

        Returns the messages received but never handed to ``on_messages``. The client library's
        own nack is dropped once its stream has stopped, so a caller that needs them back at once
        nacks their ``ack_id`` with a unary call. Nothing is handed over after this returns.
        """
        self._stopping = True
        future, manager = self._future, self._manager
        if drain > 0 and future is not None and manager is not None:
            await asyncio.to_thread(_end_gracefully, future, manager, drain)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        preparing, self._preparing = self._preparing, None
        if preparing is not None:
            await asyncio.gather(preparing, return_exceptions=True)  # see ``prepare``
        await self._cancel_future()  # joins the client's threads: no callback runs after this
        self._manager = None
        with self._lock:
            batch, self._pending = self._pending, []
        return batch


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable


def _end_gracefully(future: Any, manager: StreamingPullManager, timeout: float) -> None:
    """Close the stream's request side and wait until Pub/Sub ends the stream (or ``timeout``)."""
    requests = getattr(getattr(manager, "_rpc", None), "_request_queue", None)
    consumer = getattr(manager, "_consumer", None)
    if requests is None or consumer is None or future.done():
        return
    requests.put(None)  # the request iterator ends: gRPC half-closes the stream
    consumer.resume()  # paused by flow control, the consumer would never read the stream's end
    try:
        future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        log.warning("Pub/Sub did not end a closed streaming pull within %.1fs", timeout)
    except Exception:
        pass  # the stream ended, as it always does, with a status


def _stop(future: Any) -> None:
    future.cancel()
    try:
        future.result(timeout=10)
    except Exception:
        pass


def emulator_transport(host: str) -> SubscriberGrpcTransport:
    """The transport of the streaming client for the emulator at ``host``: an insecure channel
    with the options the library gives its channel to Pub/Sub.

    Left to itself, under ``PUBSUB_EMULATOR_HOST`` the library opens a bare
    ``grpc.insecure_channel``, which keeps gRPC's default 4 MiB limit on a received message
    (googleapis/google-cloud-python#10056). The emulator packs as many messages into one
    streaming-pull response as it has ready: once a backlog of large messages passes 4 MiB, the
    stream fails with RESOURCE_EXHAUSTED and is opened again, and the messages of that response
    were not handed out again within 30 s in our runs (the emulator fails on the old stream's
    reset and goes on treating it as open). Pub/Sub's own channel has no such limit.
    """
    channel = grpc.insecure_channel(host, options=CHANNEL_OPTIONS)
    return SubscriberGrpcTransport(channel=channel)


async def create_streaming_client() -> pubsub_v1.SubscriberClient:
    host = emulator_host()
    if host:
        return pubsub_v1.SubscriberClient(transport=emulator_transport(host))
    credentials = await CREDENTIALS.get()
    return pubsub_v1.SubscriberClient(credentials=credentials.credentials)


async def close_streaming_client(client: pubsub_v1.SubscriberClient) -> None:
    await asyncio.to_thread(client.close)


STREAMING: ClientSpec[pubsub_v1.SubscriberClient] = ClientSpec(
    "streaming-subscriber",
    create=create_streaming_client,
    close=close_streaming_client,
    eager=False,
)
