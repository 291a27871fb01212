"""What loopgate changes in Granian for every worker (nothing yet)."""

from __future__ import annotations

from ...config import Settings


def install(settings: Settings) -> None:
    """Adapt Granian (once per process, however often it is called)."""
    del settings
