"""Helpers for tests that run with authentication on: token files and JWTs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt

from service.auth.tokens import digest, new_token

JWT_SECRET = "a-test-secret-that-is-at-least-32-characters-long"


def write_tokens(path: Path, entries: dict[str, tuple[str, list[str]]], **extra: Any) -> Path:
    """Write a token file: ``{name: (token, scopes)}``; ``extra`` adds ``{name: {key: value}}``."""
    lines = []
    for name, (token, scopes) in entries.items():
        quoted = ", ".join(f'"{scope}"' for scope in scopes)
        lines.append(f'[[token]]\nname = "{name}"\nsha256 = "{digest(token)}"\nscopes = [{quoted}]')
        for key, value in extra.get(name, {}).items():
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def make_jwt(
    scopes: str | list[str] | None = None,
    *,
    key: Any = JWT_SECRET,
    algorithm: str = "HS256",
    ttl: float | None = 300,
    claim: str = "scope",
    **claims: Any,
) -> str:
    """A signed JWT with ``exp`` ``ttl`` seconds from now (none when ``ttl`` is None)."""
    payload: dict[str, Any] = {"sub": "browser-user"}
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    if scopes is not None:
        payload[claim] = scopes
    payload.update(claims)
    return jwt.encode(payload, key, algorithm=algorithm)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


__all__ = ["JWT_SECRET", "bearer", "make_jwt", "new_token", "write_tokens"]
