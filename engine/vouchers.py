"""Voucher tokens: ES256-signed JWTs a merchant can verify offline.

Keys live as PEM files in the keys directory, one per ``kid``; the newest signs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from engine.claims import Claim
from engine.times import to_rfc3339

ISSUER = "flashsale"
TOKEN_TYPE = "vch+jwt"
ALGORITHM = "ES256"


def new_kid() -> str:
    """A key id that sorts by creation time."""
    return time.strftime("k%Y%m%dT%H%M%S", time.gmtime()) + f"-{os.urandom(3).hex()}"


def rotate_key(keys_dir: Path) -> str:
    """Write a new P-256 signing key (mode 0600) into ``keys_dir``; return its kid."""
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    kid = new_kid()
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
    tmp.rename(keys_dir / f"{kid}.pem")
    return kid


class VoucherSigner:
    """Signs vouchers with the newest key in the keys directory."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._kid = ""
        self._key: Any = None
        self.reload()

    def reload(self) -> None:
        """Pick up the newest key (creating a first one if there is none)."""
        pems = sorted(self.keys_dir.glob("k*.pem")) if self.keys_dir.exists() else []
        if not pems:
            rotate_key(self.keys_dir)
            pems = sorted(self.keys_dir.glob("k*.pem"))
        newest = pems[-1]
        if newest.stem != self._kid:
            self._key = serialization.load_pem_private_key(newest.read_bytes(), password=None)
            self._kid = newest.stem

    @property
    def kid(self) -> str:
        return self._kid

    def sign(self, claim: Claim) -> str:
        """The compact JWS of a voucher."""
        payload = {
            "iss": ISSUER,
            "aud": claim.merchant_id,
            "sub": claim.user_id,
            "jti": claim.voucher_id,
            "deal": claim.deal_id,
            "iat": claim.claimed_at_ms // 1000,
            "exp": claim.redeem_until_ms // 1000,
        }
        return jwt.encode(
            payload, self._key, ALGORITHM, headers={"kid": self._kid, "typ": TOKEN_TYPE}
        )


def voucher_json(claim: Claim, token: str) -> dict[str, Any]:
    """The API's ``Voucher`` object."""
    return {
        "id": claim.voucher_id,
        "deal_id": claim.deal_id,
        "user_id": claim.user_id,
        "merchant_id": claim.merchant_id,
        "claimed_at": to_rfc3339(claim.claimed_at_ms),
        "expires_at": to_rfc3339(claim.redeem_until_ms),
        "token": token,
        "qr_url": f"/v1/vouchers/{claim.voucher_id}/qr.svg",
    }
