"""The C allocator settled for streaming: large buffers reused from the heap, not mapped afresh.

Every chunk of an object that passes through a worker is a ``bytes`` of up to 256 KiB, made by the
HTTP client's reads and freed once the server has written it. glibc's ``malloc`` serves a block
that large with a fresh ``mmap`` once it is over its mmap threshold, which starts at 128 KiB and
only rises when a mapped block is freed; and it hands the top of its heap back to the system
(``trim``) once more than twice that is free there. Either way the next chunk lands on pages the
kernel has to fault in and zero again. Whether a worker is hit depends on its heap's history (what
startup happened to allocate and free): measured on Hypercorn workers downloading 1 MB objects one
at a time, one build of loopgate took 140-200 page faults per download, the object's size in fresh
pages, and 4.2-4.4 ms of CPU each, while a Quart proxy doing the same work in the same run took
none, and so did loopgate itself after an unrelated change to its startup.

:func:`settle` fixes both thresholds with ``mallopt``: blocks up to :data:`MMAP_THRESHOLD` come from
the heap and are reused there, and the heap keeps up to :data:`TRIM_THRESHOLD` free at its top
before it returns memory. The same build and downloads, in the same run: no page faults, and
3.8-3.95 ms of CPU each. Every worker now behaves alike, whatever its history. The cost is the
memory kept: at most 8 MiB per worker, held for the next transfers.

It applies on glibc only (musl and other systems are left as they are), and not when the process
was started with the allocator settings of its own (``MALLOC_*_`` variables or
``glibc.malloc`` tunables in ``GLIBC_TUNABLES``), which are kept. Turned off with
``LOOPGATE_MALLOC_TUNING=0``.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("loopgate.server")

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1024 * 1024  # blocks up to this size come from the heap
TRIM_THRESHOLD = 8 * 1024 * 1024  # free memory the heap keeps at its top
# Variables with which glibc takes allocator settings at process start (mallopt(3)).
_OWN_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_MMAP_MAX_",
)


def glibc_version() -> str | None:
    """The running C library's version when it is glibc (``"2.36"``), else ``None``."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr at all
        return None
    return version if name == "glibc" and version else None


def own_settings(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Whether the process was started with allocator settings of its own."""
    return any(name in environ for name in _OWN_SETTINGS) or (
        "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
    )


def settle() -> bool:
    """Fix glibc's mmap and trim thresholds for this process; whether they were set."""
    if glibc_version() is None:
        log.debug("the C library is not glibc: its allocator is left as it is")
        return False
    if own_settings():
        log.debug("the allocator settings the process was started with are kept")
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the symbols already loaded, glibc's among them
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if done:
        log.info(
            "glibc allocator settled: blocks up to %d KiB reused from the heap, up to %d KiB "
            "kept free at its top (LOOPGATE_MALLOC_TUNING)",
            MMAP_THRESHOLD // 1024,
            TRIM_THRESHOLD // 1024,
        )
    else:
        log.warning("glibc refused loopgate's allocator settings; its defaults stay")
    return done
