"""Credentials: argon2id password hashes, signed JWTs with key rotation, API keys and one-time tokens.

JWTs are HS256 only (the algorithm is pinned on decode, so ``alg: none`` or an RS/HS confusion is
refused) and carry ``kid``: any key listed in ``auth.jwt_keys`` verifies, the active one signs, and
dropping a key id revokes every token it signed. API keys and invitation tokens have 256 random bits,
so a SHA-256 of them is stored; passwords are low-entropy and get argon2id.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from app.core.config import Settings
from app.models import utcnow

JWT_ALGORITHM = "HS256"
API_KEY_PREFIX = "fts_"
LOCAL_KID = "local"

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
# Verified against when the email is unknown, so a login takes as long whether or not the user exists.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


# ---------------------------------------------------------------- passwords


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password: str, hashed: str | None) -> bool:
    try:
        return _hasher.verify(hashed or _DUMMY_HASH, password) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(hashed: str) -> bool:
    return _hasher.check_needs_rehash(hashed)


# ---------------------------------------------------------------- JWT


class InvalidToken(Exception):
    """Any reason a bearer token is not accepted; the message is safe to show."""


@dataclass(frozen=True)
class SigningKeys:
    keys: dict[str, bytes]
    active_kid: str


def signing_keys(settings: Settings) -> SigningKeys:
    configured = {kid: key.get_secret_value().encode() for kid, key in settings.auth.jwt_keys.items()}
    if not configured:  # development only (production refuses to start without keys)
        return SigningKeys({LOCAL_KID: _local_key(settings.data_dir.resolve())}, LOCAL_KID)
    return SigningKeys(configured, settings.auth.jwt_active_kid or list(configured)[-1])


@lru_cache
def _local_key(data_dir: Path) -> bytes:
    """A signing key generated once per data dir, so every local process (API, CLI) shares it."""
    path = data_dir / "secrets" / "jwt-signing-key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with open(path, "x", opener=lambda p, f: os.open(p, f, 0o600)) as out:
                out.write(secrets.token_urlsafe(48))
        except FileExistsError:
            pass  # another process won the race; read theirs
    return path.read_text().strip().encode()


def create_access_token(settings: Settings, user_id: uuid.UUID) -> tuple[str, int]:
    keys = signing_keys(settings)
    now = utcnow()
    ttl = settings.auth.access_token_ttl_s
    claims = {
        "sub": str(user_id),
        "iss": settings.auth.issuer,
        "aud": settings.auth.audience,
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
        "jti": secrets.token_hex(8),
    }
    token = jwt.encode(claims, keys.keys[keys.active_kid], algorithm=JWT_ALGORITHM, headers={"kid": keys.active_kid})
    return token, ttl


@dataclass(frozen=True)
class TokenClaims:
    user_id: uuid.UUID
    issued_at: datetime


def decode_access_token(settings: Settings, token: str) -> TokenClaims:
    """The claims of a valid token; raises InvalidToken otherwise."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidToken(f"malformed token: {exc}") from None
    if header.get("alg") != JWT_ALGORITHM:
        raise InvalidToken(f"token algorithm must be {JWT_ALGORITHM}")
    key = signing_keys(settings).keys.get(str(header.get("kid")))
    if key is None:
        raise InvalidToken("token signed with an unknown or retired key id")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[JWT_ALGORITHM],
            audience=settings.auth.audience,
            issuer=settings.auth.issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
        return TokenClaims(uuid.UUID(claims["sub"]), datetime.fromtimestamp(int(claims["iat"]), UTC))
    except jwt.ExpiredSignatureError:
        raise InvalidToken("token expired") from None
    except (jwt.PyJWTError, ValueError) as exc:
        raise InvalidToken(f"invalid token: {exc}") from None


# ---------------------------------------------------------------- API keys and one-time tokens


def new_api_key() -> tuple[str, str, str]:
    """(key shown once, display prefix, stored hash). 32 random bytes = 256 bits."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    return key, key[:12], token_hash(key)


def new_one_time_token() -> tuple[str, str]:
    token = secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
