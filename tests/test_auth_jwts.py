"""JWT verification with a shared secret and with RSA and EC public key files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from authkit import JWT_SECRET, make_jwt
from conftest import make_settings
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from service.auth.jwts import InvalidJwt, JwtVerifier, looks_like_jwt
from service.config import SettingsError


def key_file(tmp_path: Path, private: Any) -> str:
    path = tmp_path / "key.pem"
    path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return str(path)


def verifier(**settings: Any) -> JwtVerifier:
    found = JwtVerifier.from_settings(make_settings(auth="enabled", **settings))
    assert found is not None
    return found


@pytest.mark.parametrize(
    ("private", "algorithm"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
    ],
)
def test_public_key_files_verify_their_algorithm(
    tmp_path: Path, private: Any, algorithm: str
) -> None:
    check = verifier(jwt_public_key_file=key_file(tmp_path, private))
    assert check.algorithm == algorithm
    token = make_jwt(["subscribe:orders"], key=private, algorithm=algorithm)
    identity = check.verify(token)
    assert identity.allows("subscribe", "orders")
    assert identity.name == "jwt:browser-user" and identity.kind == "jwt"
    # Only the configured algorithm verifies: a token signed with HS256 is refused.
    with pytest.raises(InvalidJwt, match="algorithm"):
        check.verify(make_jwt("subscribe:orders", key=JWT_SECRET, algorithm="HS256"))


def test_scope_claim_name_and_list_form() -> None:
    check = verifier(jwt_secret=JWT_SECRET, jwt_scope_claim="scopes")
    identity = check.verify(make_jwt(["publish:a", "publish:b"], claim="scopes"))
    assert identity.allows("publish", "b")
    assert not check.verify(make_jwt("publish:a", claim="scope")).allows("publish", "a")
    assert not check.verify(make_jwt({"not": "a list"}, claim="scopes")).scopes


def test_issuer_is_checked_when_configured() -> None:
    check = verifier(jwt_secret=JWT_SECRET, jwt_issuer="https://backend.example")
    assert check.verify(make_jwt("x:y", iss="https://backend.example")).name
    for token in (make_jwt("x:y", iss="https://other.example"), make_jwt("x:y")):
        with pytest.raises(InvalidJwt, match=r"issuer|'iss'"):
            check.verify(token)


def test_bad_key_settings_are_refused(tmp_path: Path) -> None:
    assert JwtVerifier.from_settings(make_settings()) is None
    with pytest.raises(SettingsError, match="at least 32"):
        verifier(jwt_secret="short")
    with pytest.raises(SettingsError, match="not both"):
        verifier(jwt_secret=JWT_SECRET, jwt_public_key_file=str(tmp_path / "k.pem"))
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(SettingsError, match="cannot load"):
        verifier(jwt_public_key_file=str(tmp_path / "k.pem"))


def test_jwt_shape() -> None:
    assert looks_like_jwt(make_jwt("a:b"))
    assert not looks_like_jwt("lg_abc.def.ghi")
    assert not looks_like_jwt("eyJhbGciOiJIUzI1NiJ9")
