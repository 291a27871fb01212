"""Per-event-loop clients: declared once, created once per loop, closed in reverse order.

A client is declared with a :class:`ClientSpec`: a name, an async factory and an async close. A
:class:`Registry` holds the instances of one event loop. Handlers never hold a registry or a client in a
global; they call an accessor, which finds the registry of the running request through a context
variable::

    DB = ClientSpec("db", create=make_pool, close=lambda pool: pool.close())
    app = create_app(clients=[DB])

    @app.get("/rows")
    async def rows():
        pool = await DB.get()          # the pool of this event loop
        ...

Creation is lazy and guarded by an ``asyncio.Lock`` per client (double-checked): however many tasks
race on a cold loop, the factory runs once. A failed creation is not cached: it is retried after a
bounded exponential backoff, and calls inside the backoff window fail fast with a 503.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from .. import metrics
from ..config import Settings
from ..errors import ClientUnavailable, ForeignLoopError

T = TypeVar("T")

log = logging.getLogger("loopgate.registry")

_cv_registry: contextvars.ContextVar[Registry] = contextvars.ContextVar("loopgate.registry")

_NO_REGISTRY = (
    "Working outside of a loopgate context: no client registry is bound. Clients are reached "
    "from request, websocket and background-task handlers of an app made by create_app(), or "
    "inside 'async with registry.bind():' for code that runs its own event loop."
)


@dataclass(frozen=True, eq=False)
class ClientSpec(Generic[T]):
    """Declares a client.

    Args:
        name: unique name, used in metrics, ``/readyz`` and errors.
        create: async factory, called with no arguments inside the registry's context, so it may
            use :func:`current_settings` and other clients' accessors.
        close: async close for an instance; ``None`` when there is nothing to close.
        check: async readiness probe for ``/readyz``; raises when the backend does not answer.
        eager: create at startup (when ``LOOPGATE_EAGER`` is on) and report it in ``/readyz``.
    """

    name: str
    create: Callable[[], Awaitable[T]]
    close: Callable[[T], Awaitable[object]] | None = None
    check: Callable[[T], Awaitable[object]] | None = None
    eager: bool = True

    async def get(self) -> T:
        """This client's instance for the running event loop, created on first use.

        Raises:
            ClientUnavailable: creation failed; retry after ``retry_after`` seconds.
            ForeignLoopError: the bound registry belongs to another event loop.
            RuntimeError: called outside a loopgate context.
        """
        return await current_registry().get(self)


@dataclass
class _Failure:
    attempts: int
    retry_at: float
    reason: str


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    creating: asyncio.Task[Any] | None = None
    failure: _Failure | None = None


class Registry:
    """The clients of one event loop."""

    def __init__(self, specs: Iterable[ClientSpec[Any]], settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self._specs: dict[str, ClientSpec[Any]] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"two clients are named {spec.name!r}")
            self._specs[spec.name] = spec
        self._instances: dict[str, Any] = {}
        self._order: list[str] = []
        self._slots: dict[str, _Slot] = {name: _Slot() for name in self._specs}
        self._closed = False

    # -- reaching clients -------------------------------------------------------------------

    def spec(self, name: str) -> ClientSpec[Any]:
        try:
            return self._specs[name]
        except KeyError:
            raise LookupError(f"no client named {name!r} is declared") from None

    @property
    def specs(self) -> list[ClientSpec[Any]]:
        return list(self._specs.values())

    def created(self) -> list[str]:
        """Names of the clients that exist, in creation order."""
        return list(self._order)

    def peek(self, name: str) -> Any | None:
        """The instance if it exists, without creating it."""
        return self._instances.get(name)

    async def get(self, spec: ClientSpec[T] | str) -> T:
        """The instance of ``spec``, creating it under its lock if needed."""
        name = spec if isinstance(spec, str) else spec.name
        if asyncio.get_running_loop() is not self.loop:
            raise ForeignLoopError(name)
        instance = self._instances.get(name)
        if instance is not None:
            return cast(T, instance)
        return cast(T, await self._create(self.spec(name)))

    def check_loop(self, name: str) -> None:
        """Raise :class:`ForeignLoopError` unless called on this registry's loop."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self.loop:
            raise ForeignLoopError(name)

    def failure(self, name: str) -> str | None:
        """Why the last creation of ``name`` failed, while it is not created."""
        failure = self._slots[name].failure
        return failure.reason if failure and name not in self._instances else None

    async def _create(self, spec: ClientSpec[Any]) -> Any:
        slot = self._slots[spec.name]
        self._raise_if_unavailable(spec.name, slot)
        async with slot.lock:
            instance = self._instances.get(spec.name)
            if instance is not None:
                return instance
            # Re-checked under the lock: a creation that failed while we waited is not retried
            # by every waiter in turn.
            self._raise_if_unavailable(spec.name, slot)
            if slot.creating is None:
                context = contextvars.copy_context()
                context.run(_cv_registry.set, self)
                slot.creating = self.loop.create_task(
                    self._run_factory(spec, slot),
                    name=f"loopgate-create-{spec.name}",
                    context=context,
                )
            # Shielded: a caller that gives up (a client disconnect) does not abort the creation
            # that other callers are waiting for.
            return await asyncio.shield(slot.creating)

    def _raise_if_unavailable(self, name: str, slot: _Slot) -> None:
        if self._closed:
            raise ClientUnavailable(name, "the service is shutting down", retry_after=1)
        failure = slot.failure
        if failure is not None:
            wait = failure.retry_at - time.monotonic()
            if wait > 0:
                raise ClientUnavailable(name, failure.reason, retry_after=wait)

    async def _run_factory(self, spec: ClientSpec[Any], slot: _Slot) -> Any:
        try:
            async with asyncio.timeout(self.settings.client_create_timeout):
                instance = await spec.create()
        except BaseException as exc:
            slot.creating = None
            attempts = slot.failure.attempts + 1 if slot.failure else 1
            delay = min(
                self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempts - 1)
            )
            reason = _describe(exc)
            slot.failure = _Failure(attempts, time.monotonic() + delay, reason)
            metrics.CLIENT_CREATION_FAILURES.labels(client=spec.name).inc()
            log.warning(
                "creating client %r failed (attempt %d, next try in %.1fs): %s",
                spec.name,
                attempts,
                delay,
                reason,
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise ClientUnavailable(spec.name, reason, retry_after=delay) from exc
        slot.creating = None
        if self._closed:
            await self._close_one(spec, instance)
            raise ClientUnavailable(spec.name, "the service is shutting down")
        slot.failure = None
        self._instances[spec.name] = instance
        self._order.append(spec.name)
        metrics.CLIENT_CREATIONS.labels(client=spec.name).inc()
        log.info("created client %r", spec.name)
        return instance

    # -- lifecycle ------------------------------------------------------------------------

    def bind(self) -> _Binding:
        """Bind this registry to the current context: ``with registry.bind(): ...``."""
        return _Binding(self)

    async def start(self) -> dict[str, str]:
        """Create every eager client, concurrently. Failures do not raise: they are returned
        (name -> reason) and the clients stay down until a later call retries them."""
        failed: dict[str, str] = {}

        async def create(spec: ClientSpec[Any]) -> None:
            try:
                await self.get(spec)
            except ClientUnavailable as exc:
                failed[spec.name] = exc.reason

        async with asyncio.TaskGroup() as group:
            for spec in self._specs.values():
                if spec.eager:
                    group.create_task(create(spec))
        return failed

    async def check(self, name: str) -> None:
        """Readiness of one client: create it if needed (respecting backoff), then probe it."""
        spec = self.spec(name)
        instance = await self.get(spec)
        if spec.check is not None:
            try:
                async with asyncio.timeout(self.settings.client_create_timeout):
                    await spec.check(instance)
            except Exception as exc:
                raise ClientUnavailable(name, _describe(exc)) from exc

    async def aclose(self) -> None:
        """Close every client in reverse creation order, each within the close timeout.

        One failing close never skips the others; their errors are raised together at the end as
        an :class:`ExceptionGroup`.
        """
        self._closed = True
        for slot in self._slots.values():
            if slot.creating is not None:
                slot.creating.cancel()
        errors: list[Exception] = []
        for name in reversed(self._order):
            instance = self._instances.pop(name)
            try:
                await self._close_one(self._specs[name], instance)
            except Exception as exc:
                log.error("closing client %r failed: %s", name, _describe(exc))
                exc.add_note(f"while closing client {name!r}")
                errors.append(exc)
        self._order.clear()
        if errors:
            raise ExceptionGroup("closing clients failed", errors)

    async def _close_one(self, spec: ClientSpec[Any], instance: Any) -> None:
        if spec.close is None:
            return
        try:
            async with asyncio.timeout(self.settings.client_close_timeout):
                await spec.close(instance)
        except TimeoutError:
            raise TimeoutError(
                f"closing client {spec.name!r} took longer than "
                f"{self.settings.client_close_timeout}s"
            ) from None
        log.info("closed client %r", spec.name)


class _Binding:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._token: contextvars.Token[Registry] | None = None

    def __enter__(self) -> Registry:
        self._token = _cv_registry.set(self._registry)
        return self._registry

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _cv_registry.reset(self._token)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.CancelledError):
        return "creation was cancelled"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# -- accessors --------------------------------------------------------------------------------


def bind_registry(registry: Registry) -> None:
    """Bind ``registry`` to the current context (used by the app's request hooks)."""
    _cv_registry.set(registry)


def has_registry() -> bool:
    """Whether a registry is bound in the current context."""
    return _cv_registry.get(None) is not None


def current_registry() -> Registry:
    """The registry bound to the current context.

    Raises:
        RuntimeError: no registry is bound (called outside the app).
    """
    registry = _cv_registry.get(None)
    if registry is None:
        registry = _registry_from_app()
    if registry is None:
        raise RuntimeError(_NO_REGISTRY)
    return registry


def current_settings() -> Settings:
    """The settings of the current registry."""
    return current_registry().settings


def _registry_from_app() -> Registry | None:
    # Background tasks and code that runs inside an app context without our request hooks
    # (Quart's startup task, for one) find the registry of their loop through the app.
    from quart import current_app
    from quart.globals import _cv_app

    if _cv_app.get(None) is None:
        return None
    loops = current_app.extensions.get("loopgate")
    if loops is None:
        return None
    registry: Registry = loops.registry_for_running_loop()
    _cv_registry.set(registry)
    return registry


class LoopRegistries:
    """The registries of one app, one per event loop that serves it."""

    def __init__(self, specs: Iterable[ClientSpec[Any]], settings: Settings) -> None:
        self.specs = list(specs)
        self.settings = settings
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Registry] = (
            weakref.WeakKeyDictionary()
        )

    def registry_for_running_loop(self) -> Registry:
        """The running loop's registry, made on first use."""
        loop = asyncio.get_running_loop()
        registry = self._by_loop.get(loop)
        if registry is None:
            registry = self._by_loop.setdefault(loop, Registry(self.specs, self.settings))
        return registry

    def forget(self, registry: Registry) -> None:
        """Drop a closed registry, so that a later serve on the same loop starts afresh."""
        if self._by_loop.get(registry.loop) is registry:
            del self._by_loop[registry.loop]
