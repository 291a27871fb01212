"""API tokens: identities, scopes, and the token file that is re-read without a restart.

The token file (``LOOPGATE_AUTH_FILE``) is TOML and holds digests, never tokens::

    [[token]]
    name = "orders-service"
    sha256 = "5e8f...c2"            # hex SHA-256 of the token
    scopes = ["publish:orders", "subscribe:orders", "storage:read:*"]
    # optional, per token; defaults come from LOOPGATE_PUBLISH_RATE and friends
    publish_rate = 50
    max_connections = 10

A scope is ``ACTION:RESOURCE``; the resource may be ``*`` (any) or end with ``*`` (a prefix). Make a
token and its entry with ``loopgate token create NAME SCOPE...``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

log = logging.getLogger("loopgate.auth")

TOKEN_PREFIX = "lg_"
_HEX64 = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Limits:
    """Per-identity overrides of the configured limits (``None``: the default)."""

    publish_rate: float | None = None
    publish_byte_rate: float | None = None
    max_connections: int | None = None


@dataclass(frozen=True)
class Identity:
    """Who is calling: a token entry, a JWT subject, or anonymous (authentication disabled)."""

    name: str
    scopes: frozenset[str]
    kind: str = "token"
    limits: Limits = field(default_factory=Limits)

    def allows(self, action: str, resource: str) -> bool:
        """Whether one of the scopes grants ``action`` on ``resource``."""
        return any(scope_allows(scope, action, resource) for scope in self.scopes)


ANONYMOUS = Identity("anonymous", frozenset({"*"}), kind="anonymous")


def scope_allows(scope: str, action: str, resource: str) -> bool:
    """``"publish:orders"`` allows publish on orders; ``"publish:*"`` on any topic;
    ``"publish:orders-*"`` on topics starting with ``orders-``; ``"*"`` allows everything."""
    if scope == "*":
        return True
    scope_action, sep, pattern = scope.rpartition(":")
    if not sep or scope_action != action:
        return False
    if pattern.endswith("*"):
        return resource.startswith(pattern[:-1])
    return bool(pattern) and pattern == resource


class TokenEntry(BaseModel):
    """One ``[[token]]`` entry of the token file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    sha256: str
    scopes: list[str] = Field(default_factory=list)
    publish_rate: float | None = Field(default=None, ge=0)
    publish_byte_rate: float | None = Field(default=None, ge=0)
    max_connections: int | None = Field(default=None, ge=1)

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.strip().lower()
        if len(value) != 64 or not set(value) <= _HEX64:
            raise ValueError("sha256 must be the 64-character hex digest of the token")
        return value

    def identity(self) -> Identity:
        limits = Limits(self.publish_rate, self.publish_byte_rate, self.max_connections)
        return Identity(self.name, frozenset(self.scopes), "token", limits)


class TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: list[TokenEntry] = Field(default_factory=list)


class TokenFileError(Exception):
    """The token file cannot be read or is invalid."""


def digest(token: str) -> str:
    """The hex SHA-256 of ``token``, as written in the token file."""
    return hashlib.sha256(token.encode()).hexdigest()


def load_token_file(path: Path) -> list[TokenEntry]:
    """Read and validate the token file.

    Raises:
        TokenFileError: the file is missing, not TOML, or has an invalid entry.
    """
    try:
        data = tomllib.loads(path.read_text())
        entries = TokenFile.model_validate(data).token
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise TokenFileError(f"invalid token file {path}: {problems}") from None
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise TokenFileError(f"invalid token file {path}: token names must be unique")
    return entries


class TokenStore:
    """The API tokens of ``path``, swapped atomically when the file is re-read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: tuple[tuple[bytes, Identity], ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def __len__(self) -> int:
        return len(self._entries)

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def reload(self) -> None:
        """Read the file now.

        Raises:
            TokenFileError: the file is invalid; the tokens loaded before stay in force.
        """
        stamp = self._file_stamp()
        entries = load_token_file(self.path)
        self._entries = tuple((entry.sha256.encode(), entry.identity()) for entry in entries)
        self._stamp = stamp
        log.info("loaded %d API tokens from %s", len(entries), self.path)

    def reload_logged(self) -> None:
        """:meth:`reload`, logging a failure instead of raising (for SIGHUP and the poller)."""
        try:
            self.reload()
        except TokenFileError as exc:
            self._stamp = self._file_stamp()  # do not retry the same broken file every poll
            log.error("%s; keeping the %d tokens loaded before", exc, len(self._entries))

    def reload_if_changed(self) -> bool:
        """Re-read the file if its modification time, size or inode changed."""
        if self._file_stamp() == self._stamp:
            return False
        self.reload_logged()
        return True

    def lookup(self, token: str) -> Identity | None:
        """The identity of ``token``, comparing against every entry in constant time."""
        wanted = digest(token).encode()
        found: Identity | None = None
        for stored, identity in self._entries:
            if hmac.compare_digest(stored, wanted):
                found = identity
        return found


def new_token() -> str:
    """A fresh random API token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def entry_toml(name: str, token: str, scopes: list[str]) -> str:
    """The ``[[token]]`` entry for ``token``."""
    quoted = ", ".join(f'"{scope}"' for scope in scopes)
    return f'[[token]]\nname = "{name}"\nsha256 = "{digest(token)}"\nscopes = [{quoted}]\n'


def main(argv: list[str]) -> int:
    """``python -m service.auth.tokens NAME SCOPE...``: ``loopgate token create NAME SCOPE...``."""
    if len(argv) < 2 or argv[0].startswith("-"):
        print("usage: loopgate token create NAME SCOPE...", file=sys.stderr)
        return 2
    from ..cli import main as cli_main

    return cli_main(["token", "create", *argv])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
