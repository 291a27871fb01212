"""Token files, scopes and constant-time lookup."""

from __future__ import annotations

from pathlib import Path

import pytest
from authkit import write_tokens

from service.auth.tokens import (
    Identity,
    TokenFileError,
    TokenStore,
    digest,
    load_token_file,
    main,
    new_token,
    scope_allows,
)


@pytest.mark.parametrize(
    ("scope", "action", "resource", "allowed"),
    [
        ("publish:orders", "publish", "orders", True),
        ("publish:orders", "publish", "orders2", False),
        ("publish:orders", "subscribe", "orders", False),
        ("publish:*", "publish", "anything", True),
        ("publish:orders-*", "publish", "orders-eu", True),
        ("publish:orders-*", "publish", "audit", False),
        ("storage:read:assets", "storage:read", "assets", True),
        ("storage:read:assets", "storage:write", "assets", False),
        ("storage:read:*", "storage:read", "media", True),
        ("*", "storage:write", "media", True),
        ("publish:", "publish", "", False),
        ("publish", "publish", "orders", False),
    ],
)
def test_scopes(scope: str, action: str, resource: str, allowed: bool) -> None:
    assert scope_allows(scope, action, resource) is allowed
    assert Identity("x", frozenset({scope})).allows(action, resource) is allowed


def test_lookup_finds_the_token_by_digest_only(tmp_path: Path) -> None:
    one, two = new_token(), new_token()
    path = write_tokens(tmp_path / "t.toml", {"one": (one, ["publish:a"]), "two": (two, [])})
    assert one not in path.read_text()  # the file holds digests, never tokens
    store = TokenStore(path)
    assert len(store) == 2
    identity = store.lookup(one)
    assert identity is not None and identity.name == "one"
    assert identity.scopes == frozenset({"publish:a"})
    assert store.lookup(digest(one)) is None
    assert store.lookup(one + "x") is None
    assert store.lookup("") is None


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[[token]]\nname = 'a'\nsha256 = 'abc'\n", "sha256"),
        ("[[token]]\nsha256 = '" + "a" * 64 + "'\n", "name"),
        ("[[token]]\nname = 'a'\nsha256 = '" + "a" * 64 + "'\nscope = ['x']\n", "scope"),
        ("[[token]]\nname = 'a'\nname = 'b'\n", "cannot read"),
        ("[token]\nname = 'a'\n", "token"),
        ("this is not toml", "cannot read"),
    ],
)
def test_invalid_token_files_are_named(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    with pytest.raises(TokenFileError, match=problem):
        load_token_file(path)


def test_token_names_must_be_unique(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    entry = "[[token]]\nname = 'a'\nsha256 = '" + "b" * 64 + "'\n"
    path.write_text(entry + entry)
    with pytest.raises(TokenFileError, match="unique"):
        load_token_file(path)


def test_reload_if_changed_keeps_old_tokens_when_the_file_breaks(tmp_path: Path) -> None:
    first, second = new_token(), new_token()
    path = write_tokens(tmp_path / "t.toml", {"first": (first, [])})
    store = TokenStore(path)
    assert not store.reload_if_changed()
    write_tokens(path, {"second": (second, []), "another": (new_token(), [])})
    assert store.reload_if_changed()
    assert store.lookup(first) is None and store.lookup(second) is not None
    path.write_text("broken = [")
    assert store.reload_if_changed()
    assert store.lookup(second) is not None
    assert not store.reload_if_changed()  # the broken file is not re-read every poll


def test_the_command_prints_a_token_and_its_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["billing", "publish:invoices", "storage:read:*"]) == 0
    out = capsys.readouterr().out
    token = out.splitlines()[0].rsplit(" ", 1)[1]
    path = tmp_path / "t.toml"
    path.write_text(out)
    identity = TokenStore(path).lookup(token)
    assert identity is not None and identity.name == "billing"
    assert identity.allows("publish", "invoices")
    assert main([]) == 2
