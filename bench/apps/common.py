"""What the Flask and FastAPI peers share: the request parsing of loopgate's publish call."""

from __future__ import annotations

import base64
import os
from typing import Any

PROJECT = os.environ.get("BENCH_PROJECT", "loopgate-bench")


def topic_path(topic: str) -> str:
    """The full Pub/Sub path of ``topic`` in the bench project."""
    return f"projects/{PROJECT}/topics/{topic}"


def payloads(body: Any) -> list[bytes]:
    """The decoded ``data`` of every message of a publish request body.

    Raises:
        ValueError: the body is not a publish request.
    """
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError("expected {'messages': [...]}")
    return [base64.b64decode(message["data"], validate=True) for message in body["messages"]]
