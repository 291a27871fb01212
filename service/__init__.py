"""loopgate: a fast, safe path from async HTTP and websocket clients to Pub/Sub and Cloud Storage.

Run it with ``hypercorn --config hypercorn.toml "service:create_app()"``.

The per-event-loop clients behind it are a Quart extension of their own,
:mod:`service.loopclients`, that any Quart app can use without the rest of loopgate.
"""

from __future__ import annotations

from . import metrics  # noqa: F401  (sets up multiprocess metrics before anything else)
from .app import create_app
from .clients import get_http, get_publisher, get_storage, get_subscriber
from .config import Settings, SettingsError, current_settings, load_settings
from .loopclients import (
    ClientSpec,
    ClientUnavailable,
    LoopClients,
    Registry,
    current_registry,
    has_registry,
)

__all__ = [
    "ClientSpec",
    "ClientUnavailable",
    "LoopClients",
    "Registry",
    "Settings",
    "SettingsError",
    "create_app",
    "current_registry",
    "current_settings",
    "get_http",
    "get_publisher",
    "get_storage",
    "get_subscriber",
    "has_registry",
    "load_settings",
]
