"""JWTs (HS256): GradAgenda account tokens and wschat message tokens.

PyJWT checks the token's form, its algorithm (HS256 only: RFC 8725
section 3.1) and its signature. The registered time claims are then
checked here (RFC 7519 section 4.1), because PyJWT converts what it is
given (a string ``exp`` passes) and does not say which claim failed:

- ``exp``, ``nbf``, ``iat`` must be NumericDates (RFC 7519 section 2): a
  finite JSON number, not a string or a boolean;
- ``exp`` must not have passed and ``nbf`` must have come, and ``iat``
  must not be in the future, each within ``leeway`` seconds of clock skew
  (RFC 7519 sections 4.1.4 and 4.1.5 allow the leeway; config
  ``jwt-leeway``);
- ``sub``, when present (required for GradAgenda), must be a non-empty
  string (RFC 7519 section 4.1.2).

``verify`` raises ``TokenRefused`` whose text names the claim and the
problem, for the client's answer and the server's log.
"""

from __future__ import annotations

import math
import time

import jwt

ALGORITHMS = ["HS256"]

# Signature and form only: the claims are checked below.
_SIGNATURE_ONLY = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                   "verify_aud": False, "verify_iss": False, "verify_sub": False,
                   "verify_jti": False}


class TokenRefused(ValueError):
    """Why a token was refused: ``token expired (exp ...)`` and the like."""


def mint(secret: str, user_id: str, ttl: float | None = 86400.0) -> str:
    """A token whose ``sub`` is ``user_id``, expiring after ``ttl`` seconds."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now}
    if ttl is not None:
        claims["exp"] = now + int(ttl)
    return jwt.encode(claims, secret, algorithm="HS256")


def verify(secret: str, token: str, *, require_exp: bool, require_sub: bool = False,
           leeway: float = 0.0, now: float | None = None) -> dict:
    """The token's claims, if its signature and claims hold.

    ``require_exp``: the token must expire (GradAgenda); without it, ``exp``
    is neither required nor enforced (wschat, as its document says).
    ``leeway``: seconds of clock skew tolerated for ``exp``, ``nbf``, ``iat``.
    ``now``: the time to check against (seconds since the epoch; default:
    the clock). Raises ``TokenRefused``.
    """
    try:
        claims = jwt.decode(token, secret, algorithms=ALGORITHMS, options=_SIGNATURE_ONLY)
    except jwt.InvalidAlgorithmError:
        raise TokenRefused(f"algorithm {_header_alg(token)!r} not accepted (HS256 only)") from None
    except jwt.InvalidSignatureError:
        raise TokenRefused("signature does not verify") from None
    except (jwt.InvalidTokenError, TypeError, ValueError):
        raise TokenRefused("not a well-formed JWT") from None
    if not isinstance(claims, dict):
        raise TokenRefused("the payload is not a JSON object")
    for claim in ("exp", "nbf", "iat"):
        if claim in claims and not _numeric_date(claims[claim]):
            raise TokenRefused(f"claim {claim!r} must be a number of seconds since the epoch, "
                               f"not {type(claims[claim]).__name__} {_short(claims[claim])}")
        if claim in claims and not 0 <= claims[claim] <= _LATEST:
            # Also keeps 10**400 out of float arithmetic (OverflowError), and
            # an exp of 1e308 from making a token that never expires.
            raise TokenRefused(f"claim {claim!r} must be a time from 1970 to 9999 in seconds "
                               f"since the epoch, not {_short(claims[claim])}")
    if "sub" in claims and not (isinstance(claims["sub"], str) and claims["sub"]):
        raise TokenRefused("claim 'sub' must be a non-empty string")
    if require_sub and "sub" not in claims:
        raise TokenRefused("claim 'sub' is missing")
    if require_exp and "exp" not in claims:
        raise TokenRefused("claim 'exp' is missing: the token must expire")
    now = time.time() if now is None else now
    if require_exp and claims["exp"] <= now - leeway:
        raise TokenRefused(f"token expired (exp {_short(claims['exp'])} is "
                           f"{now - claims['exp']:.0f} s ago)")
    if "nbf" in claims and claims["nbf"] > now + leeway:
        raise TokenRefused(f"token not valid yet (nbf {_short(claims['nbf'])} is "
                           f"{claims['nbf'] - now:.0f} s ahead, more than the {leeway:g} s allowed)")
    if "iat" in claims and claims["iat"] > now + leeway:
        raise TokenRefused(f"claim 'iat' is in the future ({claims['iat'] - now:.0f} s ahead, "
                           f"more than the {leeway:g} s allowed)")
    return claims


#: 9999-12-31T23:59:59Z: the latest NumericDate a token may carry.
_LATEST = 253_402_300_799


def _numeric_date(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _header_alg(token: str) -> object:
    try:
        return jwt.get_unverified_header(token).get("alg")
    except (jwt.InvalidTokenError, TypeError, ValueError, AttributeError):
        return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "...'"
