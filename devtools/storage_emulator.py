"""gcp-storage-emulator as loopgate's tests and ``make run`` start it: with a request body that
ends before its ``Content-Length`` refused, as Cloud Storage refuses it.

The emulator reads ``Content-Length`` bytes with one ``rfile.read`` and stores whatever came: a
client that goes away in the middle of a simple upload leaves a truncated object (in
``gcp_storage_emulator.server._read_raw_data``; not reported upstream at the time of writing).
Cloud Storage creates no object from an incomplete request. This module is the one place that
changes the emulator's internals: checked against the versions below, and by
``tests/test_storage_emulator.py``, which fails when the internal changes.

    python -m devtools.storage_emulator start --host=127.0.0.1 --port=9023 --in-memory
"""

from __future__ import annotations

import sys
import warnings
from importlib.metadata import version
from typing import Any

TESTED = ("2024.", "2025.", "2026.")  # the emulator's release years this was checked against


class IncompleteBody(Exception):
    """The request's body ended before its Content-Length."""


def patch() -> bool:
    """Make the emulator refuse a body shorter than its ``Content-Length``; whether it could."""
    from gcp_storage_emulator import server

    original = getattr(server, "_read_raw_data", None)
    if original is None or not version("gcp-storage-emulator").startswith(TESTED):
        warnings.warn(
            "gcp-storage-emulator changed: truncated uploads are stored as they came",
            stacklevel=2,
        )
        return False

    def read_raw_data(request_handler: Any) -> bytes | None:
        data: bytes | None = original(request_handler)
        declared = request_handler.headers.get("Content-Length")
        if declared and len(data or b"") < int(declared):
            raise IncompleteBody(f"body of {len(data or b'')} bytes, {declared} declared")
        return data

    server._read_raw_data = read_raw_data
    return True


def main() -> None:
    patch()
    from gcp_storage_emulator.__main__ import main as emulator_main

    sys.argv[0] = "gcp-storage-emulator"
    emulator_main()


if __name__ == "__main__":
    main()
