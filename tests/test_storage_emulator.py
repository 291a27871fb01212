"""The storage emulator as the tests start it refuses a body that ends before its
Content-Length, as Cloud Storage does (devtools/storage_emulator.py patches the emulator for it);
these tests fail when the emulator's internal that the patch replaces changes."""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.request
from typing import Any

from conftest import WAIT


def test_the_emulator_internal_that_the_patch_replaces_is_still_there() -> None:
    from gcp_storage_emulator import server

    source = inspect.getsource(server._read_raw_data)
    assert "rfile.read(int(content_length))" in source  # one read, its length not checked
    assert "_read_raw_data(request_handler)" in inspect.getsource(server._read_data)


def _objects(emulator: Any, bucket: str) -> list[str]:
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{bucket}/o", timeout=WAIT) as r:
        return [item["name"] for item in json.load(r).get("items", [])]


async def _simple_upload(emulator: Any, bucket: str, name: str, body: bytes, declared: int) -> None:
    host, port = emulator.host.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /upload/storage/v1/b/{bucket}/o?uploadType=media&name={name} HTTP/1.1\r\n"
        f"Host: {emulator.host}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    if len(body) < declared:
        writer.write_eof()  # the client goes away before the end of its body
    await asyncio.wait_for(reader.read(), WAIT)  # the emulator's answer, or its close
    writer.close()


async def test_a_truncated_simple_upload_creates_no_object(
    storage_emulator: Any, bucket: str
) -> None:
    await _simple_upload(storage_emulator, bucket, "cut", b"x" * 1000, 5000)
    await _simple_upload(storage_emulator, bucket, "whole", b"y" * 1000, 1000)
    assert _objects(storage_emulator, bucket) == ["whole"]
