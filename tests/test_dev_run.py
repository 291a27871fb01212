"""`make run`: emulators, topics and Hypercorn come up; Ctrl-C leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import ROOT, WAIT

from devtools.emulators import free_port

pytestmark = pytest.mark.server


def descendants(pid: int) -> set[int]:
    """Every process below ``pid``, from /proc."""
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.add(child)
            stack.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def test_make_run_serves_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    port = free_port()
    venv = Path(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOPGATE_", "PUBSUB_"))}
    env.update({"PORT": str(port), "WORKERS": "1", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log:
        # Its own process group, like a shell job: Ctrl-C is SIGINT to the whole group.
        make = subprocess.Popen(
            ["make", "--no-print-directory", "run", f"VENV={venv}", "-o", f"{venv}/.installed"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while "loopgate is running" not in log_path.read_text(errors="replace"):
            assert make.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.2)
        printed = log_path.read_text(errors="replace")
        token = re.search(r"token: +(lg_\S+)", printed)
        assert token, printed
        assert f"Authorization: Bearer {token[1]}" in printed  # the curl example
        assert f"access_token={token[1]}" in printed  # the websocket example
        body = {"messages": [{"data": "aGk="}]}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/readyz") as response:
                assert response.status == 200, await response.text()
            async with session.post(f"{base}/v1/topics/demo:publish", json=body) as response:
                assert response.status == 401, await response.text()
            async with session.post(
                f"{base}/v1/topics/demo:publish",
                json=body,
                headers={"Authorization": f"Bearer {token[1]}"},
            ) as response:
                assert response.status == 200, await response.text()
        started = descendants(make.pid)
        assert len(started) >= 4  # launcher, two emulators, Hypercorn (and its worker)

        os.killpg(make.pid, signal.SIGINT)
        await asyncio.to_thread(make.wait, WAIT * 2)
        async with asyncio.timeout(WAIT):
            while left := {pid for pid in started if alive(pid)}:
                await asyncio.sleep(0.1)
        assert not left
        assert "stopped." in log_path.read_text()
    finally:
        if make.poll() is None:
            make.kill()
            make.wait()
