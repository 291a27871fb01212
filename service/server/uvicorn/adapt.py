"""What loopgate changes in uvicorn for every worker (nothing yet)."""

from __future__ import annotations

from ...config import Settings


def install(settings: Settings) -> None:
    """Adapt uvicorn (once per process, however often it is called)."""
    del settings
