"""Client tokens: HMAC-signed JWTs naming the user they authenticate."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import jwt

__all__ = ["AuthError", "load_or_create_secret", "mint_token", "verify_token"]

ALGORITHM = "HS256"
"""The only algorithm accepted: pinning it stops "none" and key-confusion tricks."""

DEFAULT_TOKEN_TTL = 7 * 24 * 3600
MIN_SECRET_LENGTH = 32


class AuthError(Exception):
    """A token is missing, malformed, forged, expired or names another user."""


def mint_token(secret: str, user: str, *, ttl: float = DEFAULT_TOKEN_TTL) -> str:
    """A token that authenticates ``user`` for ``ttl`` seconds."""
    if ttl <= 0:
        raise ValueError(f"token ttl must be positive, got {ttl!r}")
    now = int(time.time())
    claims = {"sub": user, "iat": now, "exp": now + int(ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(secret: str, token: str, *, user: str) -> None:
    """Check that ``token`` is valid now and was issued to ``user``."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise AuthError("token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"token is invalid: {exc}") from exc
    if claims["sub"] != user:
        raise AuthError(f"token was issued to {claims['sub']!r}, not {user!r}")


def load_or_create_secret(data_dir: str | os.PathLike[str]) -> tuple[str, bool]:
    """Read ``data_dir/secret``, creating it (mode 0600) on first start.

    Returns the secret and whether it was just created.
    """
    path = Path(data_dir) / "secret"
    try:
        secret = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(48)
        # O_EXCL: two servers starting on one data directory must not both
        # write a secret; the loser reads the winner's.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_secret(data_dir)
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secret + "\n")
        return secret, True
    if len(secret) < MIN_SECRET_LENGTH:
        raise AuthError(
            f"secret in {str(path)!r} is {len(secret)} characters; "
            f"at least {MIN_SECRET_LENGTH} are required"
        )
    return secret, False
