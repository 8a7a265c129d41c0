"""Builders shared by the voucher, redemption and verifier tests (over the real API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

FUTURE_DEAL = {"title": "2-for-1 espresso", "lat": 12.97, "lng": 77.59, "inventory": 2000}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def create_deal(client: httpx.Client, merchant_token: str, **changes: Any) -> dict[str, Any]:
    ends = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = {**FUTURE_DEAL, "ends_at": ends, **changes}
    r = client.post("/v1/deals", json=body, headers=auth(merchant_token))
    assert r.status_code == 201, r.text
    return r.json()["deal"]  # type: ignore[no-any-return]


def claim(client: httpx.Client, deal_id: str, user_token: str) -> dict[str, Any]:
    r = client.post(f"/v1/deals/{deal_id}/claims", headers=auth(user_token))
    assert r.status_code in (200, 201), r.text
    return r.json()["voucher"]  # type: ignore[no-any-return]


def server_key(keys_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The key the server signs with now (the newest in its directory)."""
    newest = sorted(keys_dir.glob("k*.pem"))[-1]
    key = serialization.load_pem_private_key(newest.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def verify_with_jwks(client: httpx.Client, token: str, merchant_id: str) -> dict[str, Any]:
    """Verify a voucher as any third party would: with the published JWKS only."""
    jwks = client.get("/.well-known/jwks.json").json()
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    return jwt.decode(  # type: ignore[no-any-return]
        token, jwt.PyJWK(jwk), algorithms=["ES256"], audience=merchant_id, issuer="flashsale"
    )
