"""Offline voucher verification with nothing but cached public keys (pyjwt + stdlib).

The same checks as the server's :func:`engine.vouchers.verify_token`, written again on
purpose: the till shares no code with the server (``verifier/`` never imports ``engine/``).
``tests/verifier/test_verify.py`` runs every forgery of the test table through both and
requires the same verdict, so the two cannot drift apart.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.utils import base64url_decode

ISSUER = "flashsale"
TOKEN_TYPE = "vch+jwt"
ALGORITHM = "ES256"
MAX_TOKEN_CHARS = 2048
REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "deal", "iat", "exp")
MAX_ID_CHARS = 128  # aud, sub, jti, deal
MAX_TIME_S = 253_402_300_799  # iat, exp: 9999-12-31T23:59:59Z, the last RFC 3339 second

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


def _refuse(text: str) -> Any:
    raise ValueError(f"not JSON: {text}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _finite_int(text: str) -> int:
    if not math.isfinite(float(text)):
        raise ValueError("number out of range")
    return int(text)


def _json_object(segment: str) -> dict[str, Any]:
    """A base64url JSON object, read as strictly as the server's orjson reads it.

    Python's ``json`` (which pyjwt uses) also takes UTF-16, NaN, Infinity, numbers beyond
    a double and lone surrogates; the server refuses them all, so the till does too.
    """
    try:
        value = json.loads(
            base64url_decode(segment).decode("utf-8"),
            parse_constant=_refuse,
            parse_float=_finite_float,
            parse_int=_finite_int,
        )
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a lone surrogate cannot be
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError are ValueErrors
        raise Rejected("malformed token") from None
    if not isinstance(value, dict):
        raise Rejected("malformed token")
    return value


def verify(
    token: str, keys: dict[str, jwt.PyJWK], merchant_id: str, now_s: float | None = None
) -> VoucherToken:
    """Check a scanned token for ``merchant_id``; raise ``Rejected`` with the reason."""
    token = token.strip()  # scanner noise
    if not token or len(token) > MAX_TOKEN_CHARS or not _COMPACT.match(token):
        raise Rejected("malformed token")
    header_b64, payload_b64, _signature_b64 = token.split(".")
    header = _json_object(header_b64)
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
        # pyjwt checks the signature (raw r||s only: DER is refused) and that every
        # segment is canonical base64url.
        jwt.api_jws.decode_complete(token, key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise Rejected("bad signature") from None
    except jwt.InvalidTokenError as exc:
        raise Rejected(f"malformed token ({exc})") from None
    claims = _json_object(payload_b64)
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise Rejected(f"malformed token (missing {', '.join(missing)})")
    if claims["iss"] != ISSUER:
        raise Rejected("not a voucher (wrong issuer)")
    for name in ("aud", "sub", "jti", "deal"):
        value = claims[name]
        if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
            raise Rejected(f"malformed token ({name})")
    for name in ("iat", "exp"):
        value = claims[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIME_S:
            raise Rejected(f"malformed token ({name})")
    # A voucher id names its deal: v<hex>.<deal id>.
    head, dot, deal_id = claims["jti"].partition(".")
    if not (dot and head.startswith("v") and deal_id == claims["deal"]):
        raise Rejected("malformed token (jti does not name the deal)")
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
