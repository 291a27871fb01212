"""Node.js for the tests of the JavaScript client: found, checked, and tests/js's packages
installed (the test modules import it as ``jskit``)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from conftest import ROOT

JS_TESTS = ROOT / "tests" / "js"
INSTALL_HINT = (
    "the JavaScript client's tests need Node.js 20 or later and npm: install them "
    "(Debian/Ubuntu: apt-get install nodejs npm; or https://nodejs.org), then run the tests again"
)


def node() -> str:
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    major = int(version.stdout.strip().lstrip("v").split(".")[0])
    if major < 20:
        pytest.fail(f"Node.js {version.stdout.strip()} is too old: {INSTALL_HINT}", pytrace=False)
    return node


def npm_install() -> None:
    """Install tests/js's packages (``ws``) when they are not there yet."""
    if (JS_TESTS / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    assert npm is not None
    done = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=JS_TESTS,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci in tests/js failed:\n{done.stdout}\n{done.stderr}", pytrace=False)
