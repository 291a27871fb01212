"""The allocator settings of service/malloctune.py, each in a fresh interpreter: glibc's settings
are process-wide and cannot be read back, so what they change is measured (page faults)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from service import malloctune

# Chunks the size of a download's, made and freed four at a time as a worker streams them; a
# bytearray is zeroed, so every fresh page it lands on is faulted in.
CHURN = """
import importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("malloctune", sys.argv[2])
malloctune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(malloctune)
settled = malloctune.settle() if sys.argv[1] == "settle" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [256 * 1024, 96 * 1024, 200 * 1024]
for i in range(20):  # the heap grows to what the churn needs
    chunks = [bytearray(sizes[i % 3]) for _ in range(4)]
before = faults()
for i in range(300):
    chunks = [bytearray(sizes[i % 3]) for _ in range(4)]
    del chunks
print(json.dumps({"settled": settled, "faults": (faults() - before) / 300}))
"""


def churn(mode: str, **env: str) -> dict[str, object]:
    full = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    full.pop("GLIBC_TUNABLES", None)
    full.update(env)
    done = subprocess.run(
        [sys.executable, "-c", CHURN, mode, malloctune.__file__],
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_c_library_here_is_glibc() -> None:
    # The machines loopgate is tested and deployed on (Debian, the python:*-slim images).
    version = malloctune.glibc_version()
    assert version is not None and re.fullmatch(r"\d+\.\d+(\.\d+)?", version), version


def test_settled_chunks_reuse_the_heap_instead_of_faulting_in_fresh_pages() -> None:
    default = churn("default")
    settled = churn("settle")
    assert settled["settled"] is True
    # 130 faults per round here by default: the 1.5 MiB of a round mapped or trimmed and refaulted.
    assert float(default["faults"]) > 50, default  # type: ignore[arg-type]
    assert float(settled["faults"]) < 2, settled  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "env",
    [
        {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)},
        {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"},
    ],
)
def test_allocator_settings_the_process_was_started_with_are_kept(env: dict[str, str]) -> None:
    kept = churn("settle", **env)
    assert kept["settled"] is False
    # The process's own settings (128 KiB) are in force, not loopgate's: the chunks still fault.
    assert float(kept["faults"]) > 50, kept  # type: ignore[arg-type]


def test_own_settings_are_told_from_other_variables() -> None:
    assert not malloctune.own_settings({})
    assert not malloctune.own_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"})
    assert not malloctune.own_settings({"MALLOC_ARENA_MAX": "2"})
    assert malloctune.own_settings({"MALLOC_TOP_PAD_": "0"})
    tunables = "glibc.pthread.rseq=0:glibc.malloc.trim_threshold=1"
    assert malloctune.own_settings({"GLIBC_TUNABLES": tunables})
