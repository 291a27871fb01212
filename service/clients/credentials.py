"""Google credentials whose token refresh never blocks the event loop.

The generated gRPC clients attach the token through google-auth's metadata plugin, which calls
``credentials.before_request()`` on every call and, when the token has expired, refreshes it right
there, synchronously, on the event loop thread: a blocking HTTPS round trip that stalls every request
of the worker. Two things keep that path from ever running:

* the token is fetched once at creation, in a worker thread (``asyncio.to_thread``);
* a background task refreshes it in a worker thread well before it expires (``REFRESH_MARGIN``), so
  ``before_request`` always finds a valid token; google-auth's own non-blocking refresh mode is also
  switched on as a second line of defence.

With an emulator (``PUBSUB_EMULATOR_HOST`` set) none of this runs: the clients use no credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import Any

import google.auth
from google.auth.credentials import Credentials
from google.auth.transport.requests import Request

log = logging.getLogger("loopgate.credentials")

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
REFRESH_MARGIN = dt.timedelta(minutes=10)
RETRY_DELAY = 10.0


class RefreshingCredentials:
    """Application Default Credentials plus a task that refreshes them off the loop."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, credentials: Credentials | None = None) -> RefreshingCredentials:
        if credentials is None:
            credentials, _ = await asyncio.to_thread(google.auth.default, scopes=SCOPES)
        assert credentials is not None
        if hasattr(credentials, "with_non_blocking_refresh"):
            credentials.with_non_blocking_refresh()  # type: ignore[no-untyped-call]  # unannotated in google-auth
        self = cls(credentials)
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(
            self._keep_fresh(), name="loopgate-credentials-refresh"
        )
        return self

    async def refresh(self) -> None:
        """Refresh the token in a worker thread."""
        await asyncio.to_thread(self.credentials.refresh, Request())

    def seconds_until_refresh(self, now: dt.datetime | None = None) -> float:
        expiry: Any = getattr(self.credentials, "expiry", None)
        if expiry is None:
            return 300.0
        now = now or dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return max(0.0, float((expiry - REFRESH_MARGIN - now).total_seconds()))

    async def _keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(self.seconds_until_refresh())
            try:
                await self.refresh()
            except Exception as exc:  # keep the old token; try again soon
                log.warning("refreshing Google credentials failed: %s", exc)
                await asyncio.sleep(RETRY_DELAY)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
