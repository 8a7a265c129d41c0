"""Voucher signing, verification and key rotation (engine level, no server)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import jwt
import orjson
import pytest

from engine.claims import Voucher
from engine.errors import InvalidVoucher
from engine.times import MS_PER_DAY
from engine.vouchers import (
    MAX_VOUCHER_LIFE_MS,
    RETIRE_SLACK_MS,
    VoucherSigner,
    kid_created_ms,
    rotate_key,
)
from tests.vouchers.forge import forgeries, high_s, public_pem, resign
from tests.vouchers.helpers import server_key

NOW_MS = int(time.time() * 1000)


def a_voucher(user: str = "u-1", redeem_in_ms: int = MS_PER_DAY) -> Voucher:
    return Voucher(
        "v0123456789abcdef.d_1", "d_1", user, "m-1", 1, NOW_MS - 1000, NOW_MS + redeem_in_ms
    )


def test_first_key_is_created_private_and_signs(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path / "keys")
    (pem,) = (tmp_path / "keys").glob("k*.pem")
    assert pem.stat().st_mode & 0o777 == 0o600
    token = signer.sign(a_voucher())
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": signer.kid, "typ": "vch+jwt"}
    verified = signer.verify(token, NOW_MS)
    assert (verified.voucher_id, verified.user_id, verified.merchant_id) == (
        "v0123456789abcdef.d_1",
        "u-1",
        "m-1",
    )
    assert b"PRIVATE" not in signer.ring.jwks_body and b'"d"' not in signer.ring.jwks_body


def test_every_forgery_is_refused_and_high_s_is_the_same_voucher(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path)
    good = signer.sign(a_voucher())
    key = server_key(tmp_path)
    caller = jwt.encode({"sub": "m-1", "role": "merchant", "exp": 2**31}, "s" * 32, "HS256")
    for name, forge in forgeries(good, public_pem(key), key, caller).items():
        with pytest.raises(InvalidVoucher):
            signer.verify(forge())
            pytest.fail(name)
    assert signer.verify(high_s(good)).voucher_id == signer.verify(good).voucher_id
    assert signer.verify(f"\n {good} \r\n").voucher_id == "v0123456789abcdef.d_1"
    with pytest.raises(InvalidVoucher, match="expired"):
        signer.verify(resign(good, key, exp=NOW_MS // 1000 - 1), NOW_MS)
    with pytest.raises(InvalidVoucher):  # jti and deal must agree
        signer.verify(resign(good, key, deal="d_other"))
    with pytest.raises(InvalidVoucher):
        signer.verify(resign(good, key, iss="someone"))


def test_rotation_signs_with_the_new_key_and_old_tokens_still_verify(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path)
    old_kid, old_token = signer.kid, signer.sign(a_voucher())
    assert signer.reload() is False  # nothing changed: nothing rebuilt
    new_kid = rotate_key(tmp_path)
    assert new_kid > old_kid and kid_created_ms(new_kid) > kid_created_ms(old_kid)  # type: ignore[operator]
    assert signer.reload() is True and signer.kid == new_kid
    new_token = signer.sign(a_voucher("u-2"))
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    assert {k["kid"] for k in orjson.loads(signer.ring.jwks_body)["keys"]} == {
        old_kid,
        new_kid,
    }
    for token in (old_token, new_token):
        assert signer.verify(token).kid in (old_kid, new_kid)
    # Another process sharing the directory agrees.
    assert VoucherSigner(tmp_path).verify(old_token).kid == old_kid


def test_a_retired_key_is_published_until_its_last_voucher_expires(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path)
    old_kid, old_token = signer.kid, signer.sign(a_voucher(redeem_in_ms=MAX_VOUCHER_LIFE_MS))
    new_kid = rotate_key(tmp_path)
    retired_at = kid_created_ms(new_kid)
    assert retired_at is not None
    last = retired_at + RETIRE_SLACK_MS + MAX_VOUCHER_LIFE_MS
    signer.reload(now_ms=last)
    assert old_kid in signer.ring.published and signer.verify(old_token).kid == old_kid
    signer.reload(now_ms=last + 1)  # same files, but the retirement passed: rebuilt
    assert set(signer.ring.published) == {new_kid}
    with pytest.raises(InvalidVoucher, match="unknown key"):
        signer.verify(old_token)


def test_unreadable_or_foreign_key_files_do_not_stop_signing(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path)
    kid = signer.kid
    (tmp_path / "k29990101T000000.000-ffffff.pem").write_text("not a key")
    os.chmod(tmp_path / "k29990101T000000.000-ffffff.pem", 0o600)
    signer.reload()
    assert signer.kid == kid and signer.verify(signer.sign(a_voucher())).kid == kid
