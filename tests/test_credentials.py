"""Token refresh happens off the event loop, ahead of expiry (fake credentials: the emulators
use none, so this is a fault they cannot produce)."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

from google.auth.credentials import Credentials

from service.clients.credentials import REFRESH_MARGIN, RefreshingCredentials


class FakeCredentials(Credentials):  # type: ignore[misc]
    def __init__(self, lifetime: dt.timedelta) -> None:
        super().__init__()
        self.lifetime = lifetime
        self.refresh_threads: list[int] = []
        self.refreshed = threading.Event()

    def refresh(self, request: Any) -> None:
        self.refresh_threads.append(threading.get_ident())
        self.token = f"token-{len(self.refresh_threads)}"
        self.expiry = dt.datetime.now(dt.UTC).replace(tzinfo=None) + self.lifetime
        if len(self.refresh_threads) >= 2:
            self.refreshed.set()


async def test_token_is_fetched_and_refreshed_in_worker_threads() -> None:
    # Lifetime just above the margin: the background task refreshes almost at once.
    fake = FakeCredentials(REFRESH_MARGIN + dt.timedelta(milliseconds=50))
    credentials = await RefreshingCredentials.create(fake)
    try:
        assert fake.token == "token-1"
        await asyncio.wait_for(asyncio.to_thread(fake.refreshed.wait, 10), timeout=15)
    finally:
        await credentials.aclose()
    loop_thread = threading.get_ident()
    assert len(fake.refresh_threads) >= 2
    assert loop_thread not in fake.refresh_threads
    assert fake.valid


async def test_refresh_is_scheduled_before_expiry() -> None:
    fake = FakeCredentials(dt.timedelta(hours=1))
    credentials = await RefreshingCredentials.create(fake)
    try:
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        wait = credentials.seconds_until_refresh(now)
        assert 0 < wait <= (dt.timedelta(hours=1) - REFRESH_MARGIN).total_seconds()
        assert fake.refresh_threads and len(fake.refresh_threads) == 1
    finally:
        await credentials.aclose()
