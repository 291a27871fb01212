"""Schemathesis against /openapi.json of a real Hypercorn server, with authentication on: no 5xx,
no response that breaks the schema. Bounded: a fixed seed and a few examples per operation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from authkit import new_token, write_tokens
from conftest import Topic

pytestmark = pytest.mark.server

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
    ]
)


async def test_fuzzing_the_openapi_description_finds_no_5xx_and_no_schema_violation(
    start_server: Any, tmp_path: Path, topic: Topic
) -> None:
    token = new_token()
    path = write_tokens(tmp_path / "tokens.toml", {"fuzz": (token, ["*"])})
    server = await start_server(
        {"LOOPGATE_AUTH": "enabled", "LOOPGATE_AUTH_FILE": str(path), "LOOPGATE_PUBLISH_RATE": "0"}
    )
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {token}",
        "--checks",
        CHECKS,
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--no-shrink",
        "--suppress-health-check",
        "all",
    ]
    result = await asyncio.to_thread(
        subprocess.run, command, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "POST /v1/topics/{topic}:publish" in output
    assert token not in server.log()
