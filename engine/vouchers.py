"""Voucher tokens: ES256-signed JWTs a merchant can verify offline.

Keys live as PKCS#8 PEM files (mode 0600) in the keys directory, one per ``kid``; a kid
starts with its creation time (``k20261124T180000-1a2b3c``), so names sort by age and the
newest key signs. A key is *retired* when a newer one appears; it stays published in the
JWKS (and accepted here) until every voucher it may have signed has expired. That moment
is derived, not stored: a voucher's ``exp`` is at most its claim time + 30 days (the
longest claim window) + 90 days (the longest redeem period), and the retired key signed
nothing after its successor's creation time + one reload period. So the directory alone
is the state, and every API process sharing it agrees on the key set.

Running processes pick up a rotation by calling :meth:`VoucherSigner.reload` every
:data:`RELOAD_S` seconds (the API's ``vouchers`` lifespan does), well inside 10 seconds.
"""

from __future__ import annotations

import calendar
import hashlib
import itertools
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from jwt.algorithms import ECAlgorithm

from engine import base64url
from engine.claims import Voucher, deal_of_voucher, parse_holder
from engine.deals import MAX_REDEEM_AFTER_END_MS, MAX_WINDOW_MS, DealHash
from engine.errors import InvalidVoucher
from engine.redemptions import parse_redemption
from engine.store import Store
from engine.times import to_rfc3339

log = logging.getLogger(__name__)

ISSUER = "flashsale"
TOKEN_TYPE = "vch+jwt"
ALGORITHM = "ES256"

# How often running processes look at the keys directory (rotation reaches them within it).
RELOAD_S = 2.0
# The longest a voucher can live after its claim: 30 days of claim window + 90 of redeeming.
MAX_VOUCHER_LIFE_MS = MAX_WINDOW_MS + MAX_REDEEM_AFTER_END_MS
# Slack on a retired key's last signature: processes that have not reloaded yet, and clock
# skew between the host that rotated and the hosts that sign.
RETIRE_SLACK_MS = 3_600_000
# Served tokens are small; anything longer is not one of ours (and is refused unparsed).
MAX_TOKEN_CHARS = 2048
MAX_ID_CHARS = 128  # aud, sub, jti, deal
MAX_TIME_S = 253_402_300_799  # iat, exp: 9999-12-31T23:59:59Z, the last RFC 3339 second

_KID_RE = re.compile(r"^k(\d{8}T\d{6})(?:\.(\d{3}))?-[0-9a-f]{6,32}$")
_ECDSA = ec.ECDSA(hashes.SHA256())
_REQUIRED_CLAIMS = ("iss", "aud", "sub", "jti", "deal", "iat", "exp")


def new_kid(after_ms: int = 0) -> str:
    """A key id naming its creation time (ms), later than ``after_ms``; sorts by age."""
    ms = max(time.time_ns() // 1_000_000, after_ms + 1)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ms // 1000))
    return f"k{stamp}.{ms % 1000:03d}-{os.urandom(3).hex()}"


def kid_created_ms(kid: str) -> int | None:
    """The creation time a kid names, or ``None`` if it does not follow the pattern."""
    match = _KID_RE.match(kid)
    if not match:
        return None
    seconds = calendar.timegm(time.strptime(match.group(1), "%Y%m%dT%H%M%S"))
    return seconds * 1000 + int(match.group(2) or 0)


def rotate_key(keys_dir: Path) -> str:
    """Write a new P-256 signing key (mode 0600) into ``keys_dir``; return its kid."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The new key must be the newest even if the clock is behind the last rotation's host.
    existing = [kid_created_ms(p.stem) or 0 for p in keys_dir.glob("k*.pem")]
    kid = new_kid(max(existing, default=0))
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = keys_dir / f".{kid}.pem.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    # Atomic: a reloading process sees either no file or the whole key.
    tmp.rename(keys_dir / f"{kid}.pem")
    return kid


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    created_ms: int
    private: ec.EllipticCurvePrivateKey
    public: ec.EllipticCurvePublicKey
    jwk: dict[str, Any]


@dataclass(frozen=True, slots=True)
class KeyRing:
    """One consistent view of the keys directory: who signs, who may still verify.

    Immutable, so a reload swaps it in one assignment and a request never sees half of it.
    """

    signing: _Key
    published: dict[str, _Key]
    jwks_body: bytes
    etag: str
    built_ms: int
    retire_at_ms: dict[str, int] = field(default_factory=dict)


def _load_key(path: Path, kid: str) -> _Key:
    if path.stat().st_mode & 0o077:
        log.warning("signing key %s is readable by group or others; chmod 600 it", path.name)
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name != "secp256r1":
        raise ValueError(f"{path.name} is not a P-256 private key")
    public = private.public_key()
    jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    jwk.update({"kid": kid, "use": "sig", "alg": ALGORITHM})
    created = kid_created_ms(kid)
    if created is None:
        created = int(path.stat().st_mtime * 1000)
    return _Key(kid, created, private, public, jwk)


def build_ring(keys: list[_Key], now_ms: int) -> KeyRing:
    """Choose the signer (newest) and the keys still published at ``now_ms``."""
    keys = sorted(keys, key=lambda k: (k.created_ms, k.kid))
    published: dict[str, _Key] = {}
    retire_at: dict[str, int] = {}
    for older, newer in itertools.pairwise(keys):
        # The last voucher `older` can have signed expires by this time.
        until = newer.created_ms + RETIRE_SLACK_MS + MAX_VOUCHER_LIFE_MS
        retire_at[older.kid] = until
        if now_ms <= until:
            published[older.kid] = older
    signing = keys[-1]
    published[signing.kid] = signing
    body = orjson.dumps({"keys": [k.jwk for k in published.values()]})
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return KeyRing(signing, published, body, etag, now_ms, retire_at)


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
    """Signs vouchers with the newest key and verifies them with every published one."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._loaded: dict[str, _Key] = {}
        self._listing: tuple[str, ...] = ()
        self._header_b64: dict[str, bytes] = {}
        self.ring: KeyRing
        self.reload()

    def reload(self, now_ms: int | None = None) -> bool:
        """Look at the keys directory again (creating a first key if it is empty).

        Returns whether the signing key changed. Cheap when nothing changed: one listing.
        """
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        names = self._list()
        if not names:
            rotate_key(self.keys_dir)
            names = self._list()
        before = getattr(self, "ring", None)
        if names == self._listing and before is not None:
            upcoming = [t for t in before.retire_at_ms.values() if t >= before.built_ms]
            if not upcoming or min(upcoming) >= now_ms:
                return False  # same files, and no published key has passed its retirement
        loaded: dict[str, _Key] = {}
        for name in names:
            kid = name[:-4]
            key = self._loaded.get(kid)
            if key is None:
                try:
                    key = _load_key(self.keys_dir / name, kid)
                except (OSError, ValueError, TypeError) as exc:
                    log.error("cannot load signing key %s: %s", name, exc)
                    continue
            loaded[kid] = key
        if not loaded:
            raise RuntimeError(f"no usable signing key in {self.keys_dir}")
        self._loaded = loaded
        self._listing = names
        self.ring = build_ring(list(loaded.values()), now_ms)
        changed = before is None or before.signing.kid != self.ring.signing.kid
        if changed:
            log.info("vouchers are now signed with key %s", self.ring.signing.kid)
        return changed

    def _list(self) -> tuple[str, ...]:
        if not self.keys_dir.exists():
            return ()
        return tuple(sorted(p.name for p in self.keys_dir.glob("k*.pem")))

    @property
    def kid(self) -> str:
        """The kid that signs now."""
        return self.ring.signing.kid

    def _header(self, kid: str) -> bytes:
        h = self._header_b64.get(kid)
        if h is None:
            header = {"alg": ALGORITHM, "kid": kid, "typ": TOKEN_TYPE}
            h = base64url.encode(orjson.dumps(header)).encode()
            self._header_b64[kid] = h
        return h

    def sign(self, voucher: Voucher) -> str:
        """The compact JWS of a voucher (built by hand: half the cost of ``jwt.encode``)."""
        key = self.ring.signing
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
