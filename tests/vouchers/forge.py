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
    return es256_raw(json.dumps(header).encode(), json.dumps(payload).encode(), key)


def es256_raw(
    header: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey, *, der: bool = False
) -> str:
    """Sign any bytes as header and payload (raw r||s, or DER as X.509 tools write it)."""
    si = b64(header) + "." + b64(payload)
    signature = key.sign(si.encode(), ec.ECDSA(hashes.SHA256()))
    if not der:
        r, s = decode_dss_signature(signature)
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return si + "." + b64(signature)


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

    def signed(claims: dict[str, Any]) -> Callable[[], str]:
        """Claims the server never issues, validly signed with its own key."""
        return lambda: es256(header, claims, server_key)

    def signed_raw(head: bytes, body: bytes, *, der: bool = False) -> Callable[[], str]:
        return lambda: es256_raw(head, body, server_key, der=der)

    raw_header, raw_payload = json.dumps(header).encode(), json.dumps(payload).encode()
    without_iat = {k: v for k, v in payload.items() if k != "iat"}

    def non_canonical_signature() -> str:
        # 64 bytes take 86 characters: the last one carries 2 bits and 4 unused ones.
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(s[-1])
        return f"{h}.{p}.{s[:-1]}{alphabet[last ^ 1]}"

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
        "empty signature": lambda: f"{h}.{p}.",
        "newline inside": lambda: f"{h}\n.{p}.{s}",
        "non-canonical signature": non_canonical_signature,
        "DER signature (server key)": signed_raw(raw_header, raw_payload, der=True),
        "crit header (server key)": lambda: es256({**header, "crit": ["exp"]}, payload, server_key),
        "kid not a string (server key)": lambda: es256({**header, "kid": 7}, payload, server_key),
        "header in UTF-16 (server key)": signed_raw(
            json.dumps(header).encode("utf-16"), raw_payload
        ),
        "missing iat (server key)": signed(without_iat),
        "iat null (server key)": signed({**payload, "iat": None}),
        "wrong iss (server key)": signed({**payload, "iss": "someone"}),
        "jti names another deal (server key)": signed({**payload, "deal": "d_other"}),
        "aud of 129 characters (server key)": signed({**payload, "aud": "m" * 129}),
        "empty sub (server key)": signed({**payload, "sub": ""}),
        "negative iat (server key)": signed({**payload, "iat": -1}),
        "exp a float (server key)": signed({**payload, "exp": float(payload["exp"])}),
        "exp a string (server key)": signed({**payload, "exp": str(payload["exp"])}),
        "exp past year 9999 (server key)": signed({**payload, "exp": 253_402_300_800}),
        "exp 2**63 (server key)": signed({**payload, "exp": 2**63}),
        "exp 2**64 (server key)": signed({**payload, "exp": 2**64}),
        "payload an array (server key)": signed_raw(raw_header, b"[1]"),
        "payload in UTF-16 (server key)": signed_raw(
            raw_header, raw_payload.decode().encode("utf-16")
        ),
        "payload with a BOM (server key)": signed_raw(raw_header, b"\xef\xbb\xbf" + raw_payload),
        "NaN claim (server key)": signed_raw(raw_header, raw_payload[:-1] + b', "x": NaN}'),
        "1e400 claim (server key)": signed_raw(raw_header, raw_payload[:-1] + b', "x": 1e400}'),
        "400-digit claim (server key)": signed_raw(
            raw_header, raw_payload[:-1] + b', "x": ' + b"9" * 400 + b"}"
        ),
        "lone surrogate claim (server key)": signed_raw(
            raw_header, raw_payload[:-1] + b', "x": "\\ud800"}'
        ),
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
