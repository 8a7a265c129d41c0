"""Voucher tokens: ES256-signed JWTs a merchant can verify offline.

The keys, their states and who signs when are :mod:`engine.keyring`'s business; here a
:class:`VoucherSigner` keeps the keys directory's :class:`~engine.keyring.KeyRing` fresh
and signs and verifies with it. A voucher is always served signed by its *own* key (the
one that signed at its claim, a function of the claim time) while that key is published,
and re-signed by the current key once it was revoked: so the claim, a retry,
``GET /v1/vouchers/{id}``, the QR codes and ``/v1/me/vouchers`` all hand out tokens that
tills which pulled the JWKS since the key's prepublication hold a key for.

Running processes follow the directory by calling :meth:`VoucherSigner.reload` every
:data:`~engine.keyring.RELOAD_S` seconds (the API's ``vouchers`` lifespan does): a
rotation, a revocation or a key's scheduled start reaches them well inside 10 seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from engine import base64url
from engine.claims import Voucher, deal_of_voucher, parse_holder
from engine.deals import DealHash
from engine.errors import InvalidVoucher
from engine.keyring import (
    ALGORITHM,
    MAX_VOUCHER_LIFE_MS,
    RELOAD_S,
    RETIRE_SLACK_MS,
    Key,
    KeyRing,
    build_ring,
    kid_created_ms,
    load_key,
    new_kid,
    read_times,
    rotate_key,
)
from engine.redemptions import parse_redemption
from engine.store import Store
from engine.times import to_rfc3339

# Re-exported: callers that sign and verify need only this module.
__all__ = [
    "ALGORITHM",
    "ISSUER",
    "MAX_TOKEN_CHARS",
    "MAX_VOUCHER_LIFE_MS",
    "RELOAD_S",
    "RETIRE_SLACK_MS",
    "TOKEN_TYPE",
    "HeldVoucher",
    "KeyRing",
    "VoucherSigner",
    "VoucherToken",
    "kid_created_ms",
    "new_kid",
    "read_voucher",
    "rotate_key",
    "verify_token",
    "voucher_json",
]

log = logging.getLogger(__name__)

ISSUER = "flashsale"
TOKEN_TYPE = "vch+jwt"

# Served tokens are small; anything longer is not one of ours (and is refused unparsed).
MAX_TOKEN_CHARS = 2048
MAX_ID_CHARS = 128  # aud, sub, jti, deal
MAX_TIME_S = 253_402_300_799  # iat, exp: 9999-12-31T23:59:59Z, the last RFC 3339 second

_ECDSA = ec.ECDSA(hashes.SHA256())
_REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "deal", "iat", "exp")


@dataclass(frozen=True, slots=True)
class VoucherToken:
    """A verified voucher token: its payload's claims and the key that signed it."""

    voucher_id: str
    deal_id: str
    user_id: str
    merchant_id: str
    issued_at_s: int
    expires_at_s: int
    kid: str


class VoucherSigner:
    """Signs each voucher with its own key and verifies with every published one."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._loaded: dict[str, Key] = {}
        self._listing: tuple[tuple[str, int, int, int], ...] = ()
        self._header_b64: dict[str, bytes] = {}
        # Tokens verified by this signer (each costs an ES256 check unless malformed).
        self.verifications = 0
        self.ring: KeyRing
        self.reload()

    def reload(self, now_ms: int | None = None) -> bool:
        """Look at the keys directory again (writing a key that signs at once if none does).

        Returns whether the key that signs now changed. Cheap when nothing changed and no
        key's scheduled change is due: one listing and a ``stat`` per file.
        """
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        listing = self._list()
        before = getattr(self, "ring", None)
        if listing == self._listing and before is not None:
            due = before.valid_until_ms
            if due is None or now_ms < due:
                return False
        ring = self._build(listing, now_ms)
        if ring is None:
            # An empty directory, or every key revoked or not yet signing: a key must sign.
            kid = rotate_key(self.keys_dir)
            if any(name.endswith(".pem") for name, *_ in listing):
                log.warning("no key signs now in %s: wrote %s, signing at once", self.keys_dir, kid)
            else:
                log.info("wrote a first signing key %s into %s", kid, self.keys_dir)
            listing = self._list()
            # The new key was created after now_ms was read: judge from its creation on.
            now_ms = max(now_ms, kid_created_ms(kid) or 0)
            ring = self._build(listing, now_ms)
            if ring is None:
                raise RuntimeError(f"no usable signing key in {self.keys_dir}")
        self._listing = listing
        self.ring = ring
        changed = before is None or before.signing.kid != ring.signing.kid
        if changed:
            log.info("vouchers are now signed with key %s", ring.signing.kid)
        return changed

    def _build(self, listing: tuple[tuple[str, int, int, int], ...], now_ms: int) -> KeyRing | None:
        loaded: dict[str, Key] = {}
        for name, *_stat in listing:
            if not name.endswith(".pem"):
                continue
            kid = name[:-4]
            try:
                key = self._loaded.get(kid)
                if key is None:
                    key = load_key(self.keys_dir, kid)
                else:  # the key pair never changes; its schedule may (a revocation)
                    key = dataclasses.replace(key, times=read_times(self.keys_dir, kid))
            except (OSError, ValueError, TypeError) as exc:
                log.error("cannot load signing key %s: %s", name, exc)
                continue
            loaded[kid] = key
        self._loaded = loaded
        return build_ring(list(loaded.values()), now_ms) if loaded else None

    def _list(self) -> tuple[tuple[str, int, int, int], ...]:
        """Each key and schedule file with what changes when it is replaced."""
        if not self.keys_dir.exists():
            return ()
        out = []
        for path in self.keys_dir.glob("k*"):
            if path.suffix not in (".pem", ".json"):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(sorted(out))

    @property
    def kid(self) -> str:
        """The kid that signs now."""
        return self.ring.current(time.time_ns() // 1_000_000).kid

    def _header(self, kid: str) -> bytes:
        h = self._header_b64.get(kid)
        if h is None:
            header = {"alg": ALGORITHM, "kid": kid, "typ": TOKEN_TYPE}
            h = base64url.encode(orjson.dumps(header)).encode()
            self._header_b64[kid] = h
        return h

    def sign(self, voucher: Voucher) -> str:
        """The compact JWS of a voucher (built by hand: half the cost of ``jwt.encode``).

        Signed by the voucher's own key while it is published, else by the current key.
        """
        key = self.ring.key_for(voucher.claimed_at_ms, time.time_ns() // 1_000_000)
        payload = {
            "iss": ISSUER,
            "aud": voucher.merchant_id,
            "sub": voucher.user_id,
            "jti": voucher.voucher_id,
            "deal": voucher.deal_id,
            "iat": voucher.claimed_at_ms // 1000,
            "exp": voucher.redeem_until_ms // 1000,
        }
        signing_input = (
            self._header(key.kid) + b"." + base64url.encode(orjson.dumps(payload)).encode()
        )
        r, s = decode_dss_signature(key.private.sign(signing_input, _ECDSA))
        sig = base64url.encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        return signing_input.decode("ascii") + "." + sig

    def verify(self, token: str, now_ms: int | None = None) -> VoucherToken:
        """Check a token as a merchant's verifier would, with the published keys.

        Pins ``alg`` ES256 and ``typ`` vch+jwt, requires a published ``kid``, a valid
        signature, ``iss``, and well-formed claims; checks ``exp`` only if ``now_ms`` is
        given (redemption judges it by Redis's clock instead). The audience is the
        caller's business: see :func:`engine.redemptions`. Raises ``InvalidVoucher``.

        The till's ``verifier.verify.verify`` (pyjwt) makes the same checks, and
        ``tests/verifier/test_verify.py`` proves both give the same verdict on every forgery.
        """
        self.verifications += 1
        return verify_token(self.ring, token, now_ms)


def _invalid(reason: str) -> InvalidVoucher:
    return InvalidVoucher(f"This is not a valid voucher: {reason}.", reason=reason)


def verify_token(ring: KeyRing, token: object, now_ms: int | None = None) -> VoucherToken:
    """See :meth:`VoucherSigner.verify`."""
    if not isinstance(token, str):
        raise _invalid("malformed")
    token = token.strip()  # scanner noise: spaces and newlines around the token
    if not token or len(token) > MAX_TOKEN_CHARS:
        raise _invalid("malformed")
    parts = token.split(".")
    if len(parts) != 3:
        raise _invalid("malformed")
    try:
        header = orjson.loads(base64url.decode(parts[0]))
        payload = orjson.loads(base64url.decode(parts[1]))
        signature = base64url.decode(parts[2])
    except (ValueError, orjson.JSONDecodeError):
        raise _invalid("malformed") from None
    if not isinstance(header, dict) or not isinstance(payload, dict):
        raise _invalid("malformed")
    if header.get("alg") != ALGORITHM:
        raise _invalid("wrong algorithm")
    if header.get("typ") != TOKEN_TYPE:
        raise _invalid("wrong token type")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise _invalid("missing key id")
    if set(header) - {"alg", "kid", "typ"}:
        # crit, jku, x5u, jwk...: nothing we issue carries them; honouring any is a risk.
        raise _invalid("unexpected header parameters")
    key = ring.published.get(kid)
    if key is None:
        raise _invalid("unknown key")
    if len(signature) != 64:
        raise _invalid("bad signature")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    try:
        key.public.verify(encode_dss_signature(r, s), signing_input, _ECDSA)
    except (InvalidSignature, ValueError):
        raise _invalid("bad signature") from None
    return _claims(payload, kid, now_ms)


def _claims(payload: dict[str, Any], kid: str, now_ms: int | None) -> VoucherToken:
    missing = [c for c in _REQUIRED_CLAIMS if c not in payload]
    if missing:
        raise _invalid("missing claims " + ", ".join(missing))
    if payload["iss"] != ISSUER:
        raise _invalid("wrong issuer")
    strings = [payload[c] for c in ("aud", "sub", "jti", "deal")]
    if not all(isinstance(v, str) and 0 < len(v) <= MAX_ID_CHARS for v in strings):
        raise _invalid("malformed claims")
    times = [payload["iat"], payload["exp"]]
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_TIME_S for v in times
    ):
        raise _invalid("malformed claims")
    if deal_of_voucher(payload["jti"]) != payload["deal"]:
        raise _invalid("malformed claims")
    if now_ms is not None and now_ms >= payload["exp"] * 1000:
        raise _invalid("expired")
    return VoucherToken(
        voucher_id=payload["jti"],
        deal_id=payload["deal"],
        user_id=payload["sub"],
        merchant_id=payload["aud"],
        issued_at_s=payload["iat"],
        expires_at_s=payload["exp"],
        kid=kid,
    )


def voucher_json(voucher: Voucher, token: str) -> dict[str, Any]:
    """The API's ``Voucher`` object."""
    return {
        "id": voucher.voucher_id,
        "deal_id": voucher.deal_id,
        "user_id": voucher.user_id,
        "merchant_id": voucher.merchant_id,
        "claimed_at": to_rfc3339(voucher.claimed_at_ms),
        "expires_at": to_rfc3339(voucher.redeem_until_ms),
        "token": token,
        "qr_url": f"/v1/vouchers/{voucher.voucher_id}/qr.svg",
    }


@dataclass(frozen=True, slots=True)
class HeldVoucher:
    """A voucher as Redis holds it, with its redemption time if it was redeemed."""

    voucher: Voucher
    redeemed_at_ms: int | None

    @property
    def status(self) -> str:
        return "issued" if self.redeemed_at_ms is None else "redeemed"


async def read_voucher(store: Store, voucher_id: str) -> HeldVoucher | None:
    """Read a voucher from its deal's partition; ``None`` if there is no such voucher."""
    deal_id = deal_of_voucher(voucher_id)
    if deal_id is None:
        return None
    k = store.keys.for_deal(deal_id)
    pipe = store.pipeline()
    pipe.hget(k.vouchers, voucher_id)
    pipe.hmget(k.deal, DealHash.MERCHANT, DealHash.REDEEM)
    pipe.hget(k.redemptions, voucher_id)
    user, (merchant, redeem), redeemed = await pipe.execute()
    if user is None or merchant is None:
        return None
    held = await store.hget(k.claimers, user)
    if held is None:
        return None
    vid, seq, claimed_at = parse_holder(held)
    if vid != voucher_id:
        return None
    voucher = Voucher(voucher_id, deal_id, user, merchant, seq, claimed_at, int(redeem))
    return HeldVoucher(voucher, parse_redemption(redeemed)[0] if redeemed else None)
