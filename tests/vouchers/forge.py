"""Forged and re-encoded voucher tokens, built from a good one (for the forgery tables)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# The order of the P-256 group: (r, s) and (r, n - s) are both valid signatures.
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    h, p, s = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), unb64(s)


def es256(header: dict[str, Any], payload: dict[str, Any], key: ec.EllipticCurvePrivateKey) -> str:
    """Sign any header and payload with ES256 (raw r||s), as an attacker with a key would."""
    si = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    r, s = decode_dss_signature(key.sign(si.encode(), ec.ECDSA(hashes.SHA256())))
    return si + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def high_s(token: str) -> str:
    """The same signature re-encoded: s replaced by n - s (still valid for ECDSA)."""
    h, p, sig = token.split(".")
    raw = unb64(sig)
    s = int.from_bytes(raw[32:], "big")
    return f"{h}.{p}.{b64(raw[:32] + (P256_N - s).to_bytes(32, 'big'))}"


def forgeries(
    good: str, public_pem: bytes, server_key: ec.EllipticCurvePrivateKey, caller_token: str
) -> dict[str, Callable[[], str]]:
    """Every forgery the issue names, each built from a good voucher token."""
    header, payload, _sig = parts(good)
    h, p, s = good.split(".")
    stranger = ec.generate_private_key(ec.SECP256R1())

    def alg_none() -> str:
        return f"{b64(json.dumps({**header, 'alg': 'none'}).encode())}.{p}."

    def hs256_public_key() -> str:
        hh = b64(json.dumps({**header, "alg": "HS256"}).encode())
        mac = hmac.new(public_pem, f"{hh}.{p}".encode(), hashlib.sha256).digest()
        return f"{hh}.{p}.{b64(mac)}"

    def tampered_header() -> str:
        return f"{b64(json.dumps(header, indent=1).encode())}.{p}.{s}"

    def tampered_payload() -> str:
        return f"{h}.{b64(json.dumps({**payload, 'sub': 'someone-else'}).encode())}.{s}"

    def unknown_kid() -> str:
        return es256({**header, "kid": "k20200101T000000-abcdef"}, payload, stranger)

    def stranger_key_same_kid() -> str:
        return es256(header, payload, stranger)

    def missing_kid() -> str:
        return es256({"alg": "ES256", "typ": "vch+jwt"}, payload, server_key)

    def wrong_typ() -> str:
        return es256({**header, "typ": "JWT"}, payload, server_key)

    return {
        "alg none": alg_none,
        "HS256 with the public key": hs256_public_key,
        "tampered header": tampered_header,
        "tampered payload": tampered_payload,
        "truncated signature": lambda: good[:-4],
        "extended signature": lambda: good + "AAAA",
        "padded signature": lambda: good + "==",
        "unknown kid": unknown_kid,
        "known kid, another key": stranger_key_same_kid,
        "missing kid": missing_kid,
        "wrong typ (ES256, server key)": wrong_typ,
        "caller token (HS256)": lambda: caller_token,
        "two segments": lambda: f"{h}.{p}",
        "garbage": lambda: "not-a-token-at-all",
    }


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def resign(token: str, key: ec.EllipticCurvePrivateKey, **changes: Any) -> str:
    """A token with changed claims, validly signed with ``key`` (the server's, in tests)."""
    header, payload, _ = parts(token)
    return es256(header, {**payload, **changes}, key)


def unverified(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})
