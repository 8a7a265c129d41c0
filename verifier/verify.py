"""Offline voucher verification with nothing but cached public keys (pyjwt + stdlib).

The same checks as the server, written again on purpose: the till shares no code with
the server (``verifier/`` never imports ``engine/``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt

ISSUER = "flashsale"
TOKEN_TYPE = "vch+jwt"
ALGORITHM = "ES256"
MAX_TOKEN_CHARS = 2048

# Three base64url segments and nothing else: pyjwt's decoder skips stray characters,
# so a token with junk inside must be refused before it gets there.
_COMPACT = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


class Rejected(Exception):
    """The token is not a voucher this merchant may accept; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class VoucherToken:
    """A verified voucher token's claims (the server's ``engine.vouchers.VoucherToken``)."""

    voucher_id: str
    deal_id: str
    user_id: str
    merchant_id: str
    issued_at_s: int
    expires_at_s: int
    kid: str


def load_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    """The usable ES256 keys of a JWKS document, by kid; ``ValueError`` if there are none."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document")
    keys: dict[str, jwt.PyJWK] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, dict) or jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid or jwk.get("d") is not None:
            continue  # a private key in a JWKS is a server bug: never use it
        try:
            keys[kid] = jwt.PyJWK(jwk, algorithm=ALGORITHM)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
    if not keys:
        raise ValueError("the JWKS holds no usable P-256 key")
    return keys


def verify(
    token: str, keys: dict[str, jwt.PyJWK], merchant_id: str, now_s: float | None = None
) -> VoucherToken:
    """Check a scanned token for ``merchant_id``; raise ``Rejected`` with the reason."""
    token = token.strip()  # scanner noise
    if not token or len(token) > MAX_TOKEN_CHARS or not _COMPACT.match(token):
        raise Rejected("malformed token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise Rejected("malformed token") from None
    if header.get("alg") != ALGORITHM:
        raise Rejected("bad signature (algorithm is not ES256)")
    if header.get("typ") != TOKEN_TYPE:
        raise Rejected("not a voucher (typ is not vch+jwt)")
    if set(header) - {"alg", "kid", "typ"}:
        raise Rejected("malformed token (unexpected header parameters)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise Rejected("unknown key (no kid)")
    key = keys.get(kid)
    if key is None:
        raise Rejected(f"unknown key {kid} (run pull-keys when online)")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            options={
                "require": ["iss", "aud", "sub", "jti", "deal", "iat", "exp"],
                "verify_aud": False,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise Rejected("bad signature") from None
    except jwt.InvalidTokenError as exc:
        raise Rejected(f"malformed token ({exc})") from None
    if claims["iss"] != ISSUER:
        raise Rejected("not a voucher (wrong issuer)")
    for name in ("aud", "sub", "jti", "deal"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise Rejected(f"malformed token ({name})")
    for name in ("iat", "exp"):
        if not isinstance(claims[name], int) or isinstance(claims[name], bool):
            raise Rejected(f"malformed token ({name})")
    if claims["aud"] != merchant_id:
        raise Rejected("another merchant's voucher")
    now_s = time.time() if now_s is None else now_s
    if now_s >= claims["exp"]:
        raise Rejected("expired")
    return VoucherToken(
        voucher_id=claims["jti"],
        deal_id=claims["deal"],
        user_id=claims["sub"],
        merchant_id=claims["aud"],
        issued_at_s=claims["iat"],
        expires_at_s=claims["exp"],
        kid=kid,
    )


def dumps(document: Any) -> str:
    return json.dumps(document, sort_keys=True, indent=1)
