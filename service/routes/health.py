"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response
from quart_schema import hide

from .. import metrics
from ..errors import NotReady
from ..loopclients import ClientUnavailable, current_registry

blueprint = Blueprint("health", __name__)


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
    names = [spec.name for spec in registry.specs if spec.eager]
    results = await asyncio.gather(
        *(registry.check(name) for name in names), return_exceptions=True
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
