"""Clients declared once and created once per event loop, under a lock, closed in reverse order.

A client is declared with a :class:`ClientSpec`: a name, an async factory and an async close. A
:class:`Registry` holds the instances of one event loop. Creation is lazy and single-flight: an
``asyncio.Lock`` per client (double-checked) makes the factory run once however many tasks race
on a cold loop. A failed creation is not cached: it is retried after a bounded exponential
backoff, and calls inside the backoff window fail fast with :class:`ClientUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from .context import _cv_registry, current_registry
from .errors import ClientUnavailable, ForeignLoopError

T = TypeVar("T")

log = logging.getLogger("loopclients")


@dataclass(frozen=True, eq=False)
class ClientSpec(Generic[T]):
    """Declares a client.

    Args:
        name: unique name, used in logs, errors and readiness reports.
        create: async factory, called with no arguments inside the registry's context, so it may
            reach other clients through their specs and read :attr:`Registry.config`.
        close: async close for an instance; ``None`` when there is nothing to close.
        check: async readiness probe; raises when the backend does not answer.
        eager: created when the app starts serving (if the extension is eager).
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
            RuntimeError: called outside a registry's context.
        """
        return await current_registry().get(self)


@dataclass(frozen=True)
class Hooks:
    """Callbacks for metrics: each gets the client's name (and the error, for a failure)."""

    created: Callable[[str], object] | None = None
    failed: Callable[[str, BaseException], object] | None = None


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
    """The clients of one event loop.

    Args:
        specs: the declared clients, in startup order.
        config: anything the factories need (the app's settings, say); the registry never reads
            it. Factories reach it as ``current_registry().config``.
        create_timeout: seconds a factory (and a readiness check) may take.
        close_timeout: seconds each close may take.
        backoff_initial, backoff_max: the first wait after a failed creation, doubled on every
            further failure up to ``backoff_max``.
        hooks: callbacks for metrics.
    """

    def __init__(
        self,
        specs: Iterable[ClientSpec[Any]],
        *,
        config: Any = None,
        create_timeout: float = 10.0,
        close_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        hooks: Hooks | None = None,
    ) -> None:
        self.config = config
        self.create_timeout = create_timeout
        self.close_timeout = close_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.hooks = hooks or Hooks()
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
        """The spec declared under ``name``; :class:`LookupError` if there is none."""
        try:
            return self._specs[name]
        except KeyError:
            raise LookupError(f"no client named {name!r} is declared") from None

    @property
    def specs(self) -> list[ClientSpec[Any]]:
        """The declared clients, in startup order."""
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
                slot.creating = self.loop.create_task(
                    self._run_factory(spec, slot), name=f"loopclients-create-{spec.name}"
                )
            # Shielded: a caller that gives up (a client disconnect) does not abort the creation
            # that other callers are waiting for.
            return await asyncio.shield(slot.creating)

    def _raise_if_unavailable(self, name: str, slot: _Slot) -> None:
        if self._closed:
            raise ClientUnavailable(name, "the registry is closing", retry_after=1)
        failure = slot.failure
        if failure is not None:
            wait = failure.retry_at - time.monotonic()
            if wait > 0:
                raise ClientUnavailable(name, failure.reason, retry_after=wait)

    async def _run_factory(self, spec: ClientSpec[Any], slot: _Slot) -> Any:
        try:
            # The factory's task has a context of its own: what it binds ends with it.
            with self.bind():
                async with asyncio.timeout(self.create_timeout):
                    instance = await spec.create()
        except BaseException as exc:
            slot.creating = None
            attempts = slot.failure.attempts + 1 if slot.failure else 1
            delay = min(self.backoff_max, self.backoff_initial * 2 ** (attempts - 1))
            reason = describe(exc)
            slot.failure = _Failure(attempts, time.monotonic() + delay, reason)
            if self.hooks.failed is not None:
                self.hooks.failed(spec.name, exc)
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
            raise ClientUnavailable(spec.name, "the registry is closing")
        slot.failure = None
        self._instances[spec.name] = instance
        self._order.append(spec.name)
        if self.hooks.created is not None:
            self.hooks.created(spec.name)
        log.info("created client %r", spec.name)
        return instance

    # -- lifecycle ------------------------------------------------------------------------

    def bind(self) -> Binding:
        """Bind this registry to the current context: ``with registry.bind(): ...``."""
        return Binding(self)

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
        """Readiness of one client: create it if needed (respecting backoff), then probe it.

        Raises:
            ClientUnavailable: it cannot be created, or its check failed or timed out.
        """
        spec = self.spec(name)
        instance = await self.get(spec)
        if spec.check is not None:
            try:
                async with asyncio.timeout(self.create_timeout):
                    await spec.check(instance)
            except Exception as exc:
                raise ClientUnavailable(name, describe(exc)) from exc

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
                log.error("closing client %r failed: %s", name, describe(exc))
                exc.add_note(f"while closing client {name!r}")
                errors.append(exc)
        self._order.clear()
        if errors:
            raise ExceptionGroup("closing clients failed", errors)

    async def _close_one(self, spec: ClientSpec[Any], instance: Any) -> None:
        if spec.close is None:
            return
        try:
            async with asyncio.timeout(self.close_timeout):
                await spec.close(instance)
        except TimeoutError:
            raise TimeoutError(
                f"closing client {spec.name!r} took longer than {self.close_timeout}s"
            ) from None
        log.info("closed client %r", spec.name)


class Binding:
    """``with registry.bind():``: the registry is current inside, and reset afterwards."""

    __slots__ = ("_registry", "_token")

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._token: contextvars.Token[Registry] | None = None

    def __enter__(self) -> Registry:
        self._token = _cv_registry.set(self._registry)
        return self._registry

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _cv_registry.reset(self._token)
        self._token = None


def describe(exc: BaseException) -> str:
    """One line saying what went wrong, for logs and error messages."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, asyncio.CancelledError):
        return "creation was cancelled"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
