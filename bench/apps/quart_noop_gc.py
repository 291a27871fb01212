"""The no-op ceiling with loopgate's garbage-collection settings (``service/gctune.py``).

loopgate settles the collector after startup; this shows how much of any difference from the
plain no-op comes from that alone::

    hypercorn --config hypercorn.toml --workers 2 bench.apps.quart_noop_gc:app
"""

from __future__ import annotations

from service import gctune

from .quart_noop import app


@app.before_serving
async def settle_gc() -> None:
    gctune.settle()
