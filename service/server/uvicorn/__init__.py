"""Uvicorn: what loopgate adapts in it (the README's settings section lists its flags).

* :mod:`.adapt`: what :func:`install` changes in uvicorn for every worker (limits, compression,
  closing connections);
* :mod:`.shutdown`: :func:`watch_shutdown`, which closes the stream connections' gate as soon
  as uvicorn's shutdown begins.
"""

from __future__ import annotations

from .adapt import install
from .shutdown import watch_shutdown

__all__ = ["install", "watch_shutdown"]
