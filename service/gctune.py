"""Garbage collection settled for a long-running server: fewer, cheaper collections.

Under load every request allocates thousands of objects, and with CPython's default thresholds
(700, 10, 10) a worker runs about a hundred young collections a second. Requests in flight live
across many of them, so their objects are promoted and full collections follow every second or
two; each walks the whole heap, including the ~100,000 objects the imports and clients made at
startup, and holds the event loop meanwhile: a pause that every request in flight waits out.
Measured on a Hypercorn + Quart worker under 256 connections for 8 s: 740 young and 7 full
collections (on a machine shared with other work, the longest full one took 170-190 ms).

After startup :func:`settle` collects once, freezes what survives (``gc.freeze``: startup's
objects are never scanned again) and raises the young generation's threshold from 700 to 10,000
allocations, so that collections are rarer and full ones far shorter. The older generations keep
their default ratios, so cyclic garbage that outlived a few collections is still found about as
soon as before. Reference counting still frees almost everything a request allocates at once; the
collector only finds cycles, which then wait a little longer. Same setup with this: a few dozen
young collections and at most one full one, and the collector's total time fell about fivefold.
In the publish benchmark (``bench/RESULTS.md``) the no-op route with these settings had a p99 of
208 ms against 318 ms at 256 connections, in the same run; CPU per request moved within noise.
Turned off with ``LOOPGATE_GC_TUNING=0``.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)  # only the young generation's is raised (default 700)


def settle() -> None:
    """Freeze what startup made and collect less often; call once the clients exist."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
