"""Which server the seam of service/server adapts, and that each has its entry points."""

from __future__ import annotations

import importlib
import sys

import pytest

from service import server


@pytest.mark.parametrize(
    ("argv0", "expected"),
    [
        ("/venv/lib/python3.11/site-packages/uvicorn/__main__.py", "uvicorn"),
        ("/venv/bin/uvicorn", "uvicorn"),
        ("/venv/lib/python3.11/site-packages/granian/__main__.py", "granian"),
        ("/venv/bin/granian", "granian"),
        ("/venv/bin/hypercorn", "hypercorn"),
        ("/venv/lib/python3.11/site-packages/pytest/__main__.py", "hypercorn"),
    ],
)
def test_the_running_server_is_the_one_whose_command_started_the_process(
    monkeypatch: pytest.MonkeyPatch, argv0: str, expected: str
) -> None:
    monkeypatch.delenv("LOOPGATE_SERVER", raising=False)
    monkeypatch.setattr(sys, "argv", [argv0])
    assert server.running_server() == expected


def test_loopgate_server_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/hypercorn"])
    monkeypatch.setenv("LOOPGATE_SERVER", "Granian")
    assert server.running_server() == "granian"


@pytest.mark.parametrize("name", server.SERVERS)
def test_every_server_package_has_the_entry_points(name: str) -> None:
    module = importlib.import_module(f"service.server.{name}")
    assert callable(module.install)
    assert callable(module.watch_shutdown)
