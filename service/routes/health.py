"""Liveness, readiness and metrics.

``/healthz`` answers from the process alone and never asks a backend: a hung backend must not get
every worker restarted.

``/readyz`` runs the check of every eager client (``ClientSpec.check``). The built-in checks make
one real call to their backend with a deadline of ``LOOPGATE_READY_TIMEOUT`` (``ListTopics`` and
``ListSubscriptions`` for Pub/Sub, see ``clients/pubsub/specs.py``; the first allowed bucket for
Cloud Storage), so a backend that accepts connections but does not answer is noticed: a worker
probed at least once per ``LOOPGATE_READY_INTERVAL`` answers 503 at most that interval plus
``LOOPGATE_READY_TIMEOUT`` after the backend stopped answering (4 s with the defaults). The
publisher is also not ready while one of its publish calls has waited longer than
``LOOPGATE_READY_PUBLISH_STALL``.

Probes come often and from many places (a kubelet per pod, each load balancer's health checkers),
and Pub/Sub's admin operations are limited per minute per project. So a check's outcome, success or
failure, is reused for ``LOOPGATE_READY_INTERVAL`` seconds after it ends, and probes arriving while a
check runs wait for that one instead of starting their own: per worker, each client's backend gets
at most one readiness call per interval, and none while nobody probes. With the default of 2 s that
is at most 30 ``ListTopics`` plus 30 ``ListSubscriptions`` a minute per worker (and 30 Cloud Storage
metadata reads); a project's admin quota has to cover that times the number of workers probed that
often, besides the fan-out's own subscription calls; raise the interval for a large fleet. A client
that is not created yet is not cached: its creation fails fast during its backoff, at no cost.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import weakref
from dataclasses import dataclass

from quart import Blueprint, Response, current_app
from quart.blueprints import BlueprintSetupState
from quart_schema import hide

from .. import metrics
from ..config import current_settings
from ..errors import NotReady
from ..loopclients import ClientUnavailable, Registry, current_registry

blueprint = Blueprint("health", __name__)

READINESS = "loopgate.readiness"  # the app's Readiness, in app.extensions


@dataclass(eq=False)
class _Check:
    """A client's latest check: running (shared by the probes that arrive meanwhile), or ended
    with an outcome that is reused until ``expires``."""

    instance: object  # the client checked: a client created again is checked afresh
    running: asyncio.Task[None] | None
    reason: str | None = None  # why it failed; None when it passed
    retry_after: float = 1.0
    expires: float = math.inf

    def ended(self, interval: float, task: asyncio.Task[None]) -> None:
        self.running = None
        if task.cancelled():
            self.expires = 0.0  # cancelled by shutdown: no outcome to reuse
            return
        # Only the outcome is kept, not the exception: its traceback holds the registry, which
        # must stay collectable (it is the weak key of Readiness' table).
        error = task.exception()
        if isinstance(error, ClientUnavailable):
            self.reason, self.retry_after = error.reason, error.retry_after
        elif error is not None:
            self.reason = repr(error)
        self.expires = time.monotonic() + interval


class Readiness:
    """The latest check of every client, per event loop (a registry belongs to one loop)."""

    def __init__(self) -> None:
        self._checks: weakref.WeakKeyDictionary[Registry, dict[str, _Check]] = (
            weakref.WeakKeyDictionary()
        )

    async def check(self, registry: Registry, name: str, interval: float) -> None:
        """Readiness of one client: its last check's outcome while younger than ``interval``
        seconds, else the check in progress, else a new check.

        Raises:
            ClientUnavailable: the client cannot be created, or its check failed or timed out.
        """
        spec = registry.spec(name)
        instance = await registry.get(spec)
        if spec.check is None:
            return
        checks = self._checks.setdefault(registry, {})
        check = checks.get(name)
        if (
            check is None
            or check.instance is not instance
            or (check.running is None and time.monotonic() >= check.expires)
        ):
            task = registry.loop.create_task(registry.check(name), name=f"readyz-check-{name}")
            check = checks[name] = _Check(instance, task)
            task.add_done_callback(functools.partial(check.ended, interval))
        if check.running is not None:
            # Shielded: a probe that gives up (its client went away) does not abort the check
            # that other probes are waiting for.
            await asyncio.shield(check.running)
        elif check.reason is not None:
            raise ClientUnavailable(name, check.reason, retry_after=check.retry_after)


@blueprint.record_once
def _init_readiness(state: BlueprintSetupState) -> None:
    state.app.extensions[READINESS] = Readiness()


@blueprint.get("/healthz")
@hide
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@blueprint.get("/readyz")
@hide
async def readyz() -> dict[str, object]:
    """200 when every eager client exists and answers; 503 naming the ones that do not.

    Raises:
        NotReady: some eager client is down (503 with ``Retry-After``).
    """
    registry = current_registry()
    readiness: Readiness = current_app.extensions[READINESS]
    interval = current_settings().ready_interval
    names = [spec.name for spec in registry.specs if spec.eager]
    results = await asyncio.gather(
        *(readiness.check(registry, name, interval) for name in names), return_exceptions=True
    )
    clients: dict[str, str] = {}
    down: list[ClientUnavailable] = []
    for name, result in zip(names, results, strict=True):
        if isinstance(result, ClientUnavailable):
            clients[name] = f"down: {result.reason}"
            down.append(result)
        elif isinstance(result, BaseException):
            clients[name] = f"down: {result!r}"
            down.append(ClientUnavailable(name, repr(result)))
        else:
            clients[name] = "ok"
    if down:
        message = "; ".join(error.message for error in down)
        retry_after = min(error.retry_after or 1 for error in down)
        raise NotReady(message, clients=clients, retry_after=retry_after)
    return {"status": "ready", "clients": clients}


@blueprint.get("/metrics")
@hide
async def metrics_endpoint() -> Response:
    """Prometheus metrics of every worker of this instance."""
    payload, content_type = metrics.render()
    return Response(payload, content_type=content_type)
