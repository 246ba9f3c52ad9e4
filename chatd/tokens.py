"""JWTs (HS256): GradAgenda account tokens and wschat message tokens."""

from __future__ import annotations

import time

import jwt

ALGORITHMS = ["HS256"]


def mint(secret: str, user_id: str, ttl: float | None = 86400.0) -> str:
    """A token whose ``sub`` is ``user_id``, expiring after ``ttl`` seconds."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now}
    if ttl is not None:
        claims["exp"] = now + int(ttl)
    return jwt.encode(claims, secret, algorithm="HS256")


def verify(secret: str, token: str, *, require_exp: bool) -> dict | None:
    """The token's claims if its signature (and ``exp``, if required) hold."""
    options = {"require": ["exp"] if require_exp else [], "verify_exp": require_exp}
    try:
        return jwt.decode(token, secret, algorithms=ALGORITHMS, options=options)
    except (jwt.InvalidTokenError, TypeError, ValueError):
        return None
