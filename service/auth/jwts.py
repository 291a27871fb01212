"""JWTs minted by the user's own backend, for browser subscribers (PyJWT).

One verification key: an HS256 shared secret (``LOOPGATE_JWT_SECRET``) or a PEM public key file
(``LOOPGATE_JWT_PUBLIC_KEY_FILE``; RSA keys verify RS256, P-256/384/521 keys ES256/384/512). The
algorithm follows the configured key, never the token's header. ``exp`` is required, and lifetimes
longer than ``LOOPGATE_JWT_MAX_TTL`` are refused; ``aud`` and ``iss`` are checked when configured.
Scopes come from the ``LOOPGATE_JWT_SCOPE_CLAIM`` claim: a space-separated string (OAuth's
``scope``) or a list (``scopes``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ..config import Settings, SettingsError
from .tokens import Identity

log = logging.getLogger("loopgate.auth")

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class InvalidJwt(Exception):
    """The JWT is not valid; the message says why without quoting the token."""


def looks_like_jwt(credential: str) -> bool:
    """JWS compact form: three base64url parts."""
    return credential.count(".") == 2 and credential.startswith("eyJ")


class JwtVerifier:
    """Verifies JWTs against one configured key."""

    def __init__(self, key: Any, algorithm: str, settings: Settings) -> None:
        self.key = key
        self.algorithm = algorithm
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.scope_claim = settings.jwt_scope_claim
        self.leeway = settings.jwt_leeway
        self.max_ttl = settings.jwt_max_ttl

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """The verifier for the configured key, or ``None`` when no JWT key is configured.

        Raises:
            SettingsError: both a secret and a key file are set, or the key file is unusable.
        """
        secret, path = settings.jwt_secret, settings.jwt_public_key_file
        if secret is not None and path is not None:
            raise SettingsError(
                "set one of LOOPGATE_JWT_SECRET and LOOPGATE_JWT_PUBLIC_KEY_FILE, not both"
            )
        if secret is not None:
            if len(secret.get_secret_value()) < 32:
                raise SettingsError("LOOPGATE_JWT_SECRET must be at least 32 characters")
            return cls(secret.get_secret_value(), "HS256", settings)
        if path is None:
            return None
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise SettingsError(
                f"LOOPGATE_JWT_PUBLIC_KEY_FILE: cannot load {path}: {exc}"
            ) from None
        if isinstance(key, rsa.RSAPublicKey):
            return cls(key, "RS256", settings)
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
            return cls(key, _EC_ALGORITHMS[key.curve.name], settings)
        raise SettingsError(
            f"LOOPGATE_JWT_PUBLIC_KEY_FILE: {path} is neither an RSA nor a P-256/384/521 key"
        )

    def verify(self, token: str) -> Identity:
        """The identity a valid JWT names.

        Raises:
            InvalidJwt: bad signature, expired, wrong audience or issuer, missing claims.
        """
        required = ["exp"]
        if self.audience is not None:
            required.append("aud")
        if self.issuer is not None:
            required.append("iss")
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": required},
            )
        except jwt.PyJWTError as exc:
            raise InvalidJwt(f"invalid JWT: {_reason(exc)}") from None
        exp = claims["exp"]
        if not isinstance(exp, int | float) or exp - time.time() > self.max_ttl:
            raise InvalidJwt("invalid JWT: exp is further away than the longest lifetime allowed")
        subject = claims.get("sub")
        name = f"jwt:{subject}" if isinstance(subject, str) and subject else "jwt"
        return Identity(name[:200], self._scopes(claims), "jwt")

    def _scopes(self, claims: dict[str, Any]) -> frozenset[str]:
        value = claims.get(self.scope_claim)
        if isinstance(value, str):
            return frozenset(value.split())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return frozenset(value)
        return frozenset()


def _reason(exc: jwt.PyJWTError) -> str:
    """PyJWT's message for the common failures; they never include the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "expired"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "wrong audience"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "wrong issuer"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "bad signature"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "algorithm not allowed"
    return "malformed or not verifiable"
