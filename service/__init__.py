"""loopgate: a fast, safe path from async HTTP and websocket clients to Pub/Sub and Cloud Storage.

Run it with ``hypercorn --config hypercorn.toml "service:create_app()"``.
"""

from __future__ import annotations

from . import metrics  # noqa: F401  (sets up multiprocess metrics before anything else)
from .app import create_app
from .clients import get_http, get_publisher, get_subscriber
from .config import Settings, SettingsError, load_settings
from .loopclients.registry import (
    ClientSpec,
    Registry,
    current_registry,
    current_settings,
    has_registry,
)

__all__ = [
    "ClientSpec",
    "Registry",
    "Settings",
    "SettingsError",
    "create_app",
    "current_registry",
    "current_settings",
    "get_http",
    "get_publisher",
    "get_subscriber",
    "has_registry",
    "load_settings",
]
