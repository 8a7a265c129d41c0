"""Caller identity: HS256 bearer tokens with ``sub``, ``role``, ``exp``; algorithm pinned.

Verified tokens are cached (until their ``exp``) so a hot caller costs one dict lookup,
not a second HMAC and JSON parse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt

from engine.errors import Forbidden, Unauthenticated

ALGORITHM = "HS256"
ROLES = ("user", "merchant", "admin")
MAX_ID_LEN = 64


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: the token's ``sub`` and ``role``."""

    id: str
    role: str
    exp: float


def mint(secret: str, sub: str, role: str, ttl_s: float = 3600.0) -> str:
    """A caller token, as ``flashsale token`` prints it."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    now = int(time.time())
    return jwt.encode(
        {"sub": sub, "role": role, "iat": now, "exp": now + int(ttl_s)}, secret, ALGORITHM
    )


class Authenticator:
    """Verifies bearer tokens, keeping a bounded cache of the ones already verified."""

    def __init__(self, secret: str, cache_size: int = 100_000) -> None:
        self._secret = secret
        self._cache: OrderedDict[str, Caller] = OrderedDict()
        self._cache_size = cache_size

    def caller(self, authorization: str | None) -> Caller:
        """The caller an ``Authorization`` header names; ``Unauthenticated`` otherwise."""
        if not authorization:
            raise Unauthenticated("An Authorization: Bearer <token> header is required.")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token or " " in token.strip():
            raise Unauthenticated("The Authorization header must be 'Bearer <token>'.")
        token = token.strip()
        hit = self._cache.get(token)
        if hit is not None:
            if hit.exp > time.time():
                return hit
            self._cache.pop(token, None)
            raise Unauthenticated("The token has expired.")
        caller = self._verify(token)
        self._cache[token] = caller
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return caller

    def _verify(self, token: str) -> Caller:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "role", "exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("The token has expired.") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"The token is not valid: {exc}.") from None
        sub, role = claims.get("sub"), claims.get("role")
        if not isinstance(sub, str) or not 0 < len(sub) <= MAX_ID_LEN:
            raise Unauthenticated("The token's sub must be a string of 1..64 characters.")
        if role not in ROLES:
            raise Unauthenticated(f"The token's role must be one of {', '.join(ROLES)}.")
        return Caller(sub, role, float(claims["exp"]))

    def require(self, authorization: str | None, *roles: str) -> Caller:
        """The caller, who must hold one of ``roles`` (403 otherwise)."""
        caller = self.caller(authorization)
        if caller.role not in roles:
            raise Forbidden(f"This needs the role {' or '.join(roles)}.", role=caller.role)
        return caller
