"""Caller identity: HS256 bearer tokens with ``sub``, ``role``, ``exp``; algorithm pinned.

Verified tokens are cached (until their ``exp``) so a hot caller costs one dict lookup,
not a second HMAC and JSON parse.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt
import orjson

from api.validation import valid_id
from engine import base64url
from engine.errors import Forbidden, Unauthenticated

ALGORITHM = "HS256"
ROLES = ("user", "merchant", "admin")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")


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
    if not valid_id(sub):
        raise ValueError("sub must be 1..64 URL-safe characters (A-Z a-z 0-9 . _ ~ -)")
    now = int(time.time())
    return jwt.encode(
        {"sub": sub, "role": role, "iat": now, "exp": now + int(ttl_s)}, secret, ALGORITHM
    )


class Authenticator:
    """Verifies bearer tokens, keeping a bounded cache of the ones already verified."""

    def __init__(self, secret: str, cache_size: int = 100_000) -> None:
        self._key = secret.encode()
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
        """Verify an HS256 JWT by hand: the same checks as ``jwt.decode``, a fifth of the cost.

        A flash-sale crowd is mostly first-time callers, so this runs once per caller
        and showed up as a third of a claim's CPU. Only ``alg: HS256`` is accepted;
        ``crit`` is refused (we understand no extensions); ``exp`` is required.
        """
        parts = token.split(".")
        if len(parts) != 3 or not all(_B64URL.fullmatch(x) for x in parts):
            raise Unauthenticated("The token is not a compact JWT.")
        head_b64, body_b64, sig_b64 = parts
        try:
            header = orjson.loads(base64url.decode(head_b64))
            signature = base64url.decode(sig_b64)
        except (ValueError, orjson.JSONDecodeError):
            raise Unauthenticated("The token is malformed.") from None
        if not isinstance(header, dict) or header.get("alg") != ALGORITHM:
            raise Unauthenticated(f"The token must be signed with {ALGORITHM}.")
        if "crit" in header:
            raise Unauthenticated("The token names critical extensions we do not support.")
        signed = f"{head_b64}.{body_b64}".encode("ascii")
        expected = hmac.new(self._key, signed, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            raise Unauthenticated("The token's signature is not valid.")
        try:
            claims = orjson.loads(base64url.decode(body_b64))
        except (ValueError, orjson.JSONDecodeError):
            raise Unauthenticated("The token is malformed.") from None
        if not isinstance(claims, dict):
            raise Unauthenticated("The token's payload must be a JSON object.")
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise Unauthenticated("The token must carry a numeric exp.")
        now = time.time()
        if exp <= now:
            raise Unauthenticated("The token has expired.")
        nbf = claims.get("nbf")
        if nbf is not None and (
            isinstance(nbf, bool) or not isinstance(nbf, int | float) or nbf > now
        ):
            raise Unauthenticated("The token is not valid yet.")
        sub, role = claims.get("sub"), claims.get("role")
        if not isinstance(sub, str) or not valid_id(sub):
            raise Unauthenticated("The token's sub must be 1..64 URL-safe characters.")
        if role not in ROLES:
            raise Unauthenticated(f"The token's role must be one of {', '.join(ROLES)}.")
        return Caller(sub, role, float(exp))

    def require(self, authorization: str | None, *roles: str) -> Caller:
        """The caller, who must hold one of ``roles`` (403 otherwise)."""
        caller = self.caller(authorization)
        if caller.role not in roles:
            raise Forbidden(f"This needs the role {' or '.join(roles)}.", role=caller.role)
        return caller
