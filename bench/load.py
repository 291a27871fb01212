"""One load run: wrk against one server, with the CPU every party used meanwhile."""

from __future__ import annotations

import json
import os
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import Server, cpu_seconds, machine_busy_seconds

LUA = Path(__file__).with_name("publish.lua")
MARK = "BENCH_RESULT "


@dataclass(frozen=True)
class Run:
    """What one wrk run measured; latencies in milliseconds, CPU in seconds."""

    setup: str
    connections: int
    messages: int
    requests: int
    seconds: float
    errors: int
    p50_ms: float
    p99_ms: float
    server_cpu: float
    emulator_cpu: float
    wrk_cpu: float
    other_cpu: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def mps(self) -> float:
        return self.rps * self.messages


def run_wrk(
    server: Server,
    *,
    url_path: str,
    body_file: Path,
    messages: int,
    connections: int,
    duration: float,
    threads: int,
    emulator_pid: int,
) -> Run:
    """Load ``server`` for ``duration`` seconds with ``connections`` keep-alive connections.

    Raises:
        RuntimeError: wrk failed or printed no result.
    """
    command = [
        "wrk",
        f"--threads={threads}",
        f"--connections={connections}",
        f"--duration={max(1, round(duration))}s",
        "--timeout=10s",
        f"--script={LUA}",
        server.base_url + url_path,
    ]
    env = {**os.environ, "BENCH_BODY_FILE": str(body_file)}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = server.cpu_seconds()
    emulator_before = cpu_seconds([emulator_pid])
    busy_before = machine_busy_seconds()
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=duration + 60, check=False
    )
    busy = machine_busy_seconds() - busy_before
    server_cpu = server.cpu_seconds() - server_before
    emulator_cpu = cpu_seconds([emulator_pid]) - emulator_before
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(MARK)]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr[-500:]}")
    result = json.loads(lines[-1][len(MARK) :])
    errors = sum(result[key] for key in ("connect", "read", "write", "status", "timeout"))
    return Run(
        setup=server.key,
        connections=connections,
        messages=messages,
        requests=int(result["requests"]),
        seconds=result["duration_us"] / 1e6,
        errors=int(errors),
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        server_cpu=server_cpu,
        emulator_cpu=emulator_cpu,
        wrk_cpu=wrk_cpu,
        other_cpu=max(0.0, busy - server_cpu - emulator_cpu - wrk_cpu),
    )
