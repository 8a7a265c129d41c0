"""Key states (next, current, retired, revoked), who signs when, and the keys directory."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import jwt
import orjson
import pytest

from engine.claims import Voucher
from engine.errors import InvalidVoucher
from engine.keyring import (
    MAX_VOUCHER_LIFE_MS,
    RETIRE_SLACK_MS,
    KeyDirError,
    KeyTimes,
    Schedule,
    kid_created_ms,
    list_keys,
    read_times,
    revoke_key,
    rotate_key,
)
from engine.settings import Settings, SettingsError
from engine.times import MS_PER_DAY
from engine.vouchers import VoucherSigner

HOUR_MS = 3_600_000


def a_voucher(claimed_at_ms: int, user: str = "u-1") -> Voucher:
    return Voucher(
        f"v{user.encode().hex():0>16}.d_1",
        "d_1",
        user,
        "m-1",
        1,
        claimed_at_ms,
        claimed_at_ms + MS_PER_DAY,
    )


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def created(kid: str) -> int:
    ms = kid_created_ms(kid)
    assert ms is not None
    return ms


def jwks_kids(signer: VoucherSigner) -> set[str]:
    return {k["kid"] for k in orjson.loads(signer.ring.jwks_body)["keys"]}


def test_a_rotated_key_is_published_at_once_and_signs_only_after_the_prepublication(
    tmp_path: Path,
) -> None:
    signer = VoucherSigner(tmp_path)
    old = signer.kid
    new = rotate_key(tmp_path, prepublish_ms=24 * HOUR_MS)
    created = kid_created_ms(new)
    assert created is not None
    assert read_times(tmp_path, new).signs_from_ms == created + 24 * HOUR_MS
    signer.reload(now_ms=created + 1)
    assert jwks_kids(signer) == {old, new}  # a till refreshing now holds both
    assert signer.ring.current(created + 1).kid == old
    before = a_voucher(created + 1)
    assert kid_of(signer.sign(before)) == old
    # After the prepublication the new key signs new vouchers; older ones keep their own.
    later = created + 24 * HOUR_MS
    signer.reload(now_ms=later)
    assert signer.ring.current(later).kid == new
    assert kid_of(signer.sign(a_voucher(later, "u-2"))) == new
    assert kid_of(signer.sign(before)) == old
    assert {s.times.kid: s.state for s in list_keys(tmp_path, later)} == {
        old: "retired",
        new: "current",
    }


def test_the_key_for_a_voucher_follows_its_claim_time_not_the_moment_it_is_served(
    tmp_path: Path,
) -> None:
    """Claim, retry, GET, QR, /me: the same kid, whenever and by whichever process."""
    signer = VoucherSigner(tmp_path)
    first = signer.kid
    second = rotate_key(tmp_path, prepublish_ms=0)
    signer.reload()
    t2 = read_times(tmp_path, second).signs_from_ms
    old_voucher, new_voucher = a_voucher(t2 - 1), a_voucher(t2, "u-2")
    other = VoucherSigner(tmp_path)  # another process sharing the directory
    for s in (signer, other):
        assert kid_of(s.sign(old_voucher)) == first
        assert kid_of(s.sign(new_voucher)) == second
        assert s.verify(s.sign(old_voucher)).kid == first
    assert signer.ring.etag == other.ring.etag
    assert signer.ring.jwks_body == other.ring.jwks_body


def test_revoking_the_current_key_writes_one_that_signs_at_once_and_resigns_its_vouchers(
    tmp_path: Path,
) -> None:
    signer = VoucherSigner(tmp_path)
    compromised = signer.kid
    voucher = a_voucher(created(compromised) + 1)
    old_token = signer.sign(voucher)
    assert kid_of(old_token) == compromised
    pending = rotate_key(tmp_path, prepublish_ms=24 * HOUR_MS)  # a next key stays next
    done = revoke_key(tmp_path, compromised)
    assert done.replacement is not None and not done.already
    assert signer.reload() is True
    assert signer.kid == done.replacement
    assert jwks_kids(signer) == {done.replacement, pending}
    resigned = signer.sign(voucher)
    assert kid_of(resigned) == done.replacement
    assert signer.verify(resigned).voucher_id == voucher.voucher_id
    with pytest.raises(InvalidVoucher, match="unknown key"):
        signer.verify(old_token)  # refused online from now on
    states = {s.times.kid: s.state for s in list_keys(tmp_path)}
    assert states == {compromised: "revoked", done.replacement: "current", pending: "next"}
    assert revoke_key(tmp_path, compromised).already
    with pytest.raises(KeyDirError):
        revoke_key(tmp_path, "k-nope")
    with pytest.raises(KeyDirError):
        revoke_key(tmp_path, "../" + compromised)


def test_revoking_a_retired_key_resigns_its_vouchers_with_the_current_key(
    tmp_path: Path,
) -> None:
    signer = VoucherSigner(tmp_path)
    retired = signer.kid
    voucher = a_voucher(created(retired) + 1)
    current = rotate_key(tmp_path)
    signer.reload()
    assert kid_of(signer.sign(voucher)) == retired  # its own key while published
    assert revoke_key(tmp_path, retired).replacement is None
    assert signer.reload() is False  # the signer did not change, the JWKS did
    assert jwks_kids(signer) == {current}
    assert kid_of(signer.sign(voucher)) == current


def test_the_schedule_knows_who_signed_when_across_revocations() -> None:
    a = KeyTimes("ka", 0, 0)
    b = KeyTimes("kb", 10, 100, revoked_at_ms=50)  # revoked while next: never signed
    c = KeyTimes("kc", 200, 300, revoked_at_ms=400)  # signed 300..400
    d = KeyTimes("kd", 400, 400)  # written by the revocation of c: signs at once
    s = Schedule([a, b, c, d])
    assert [s.signer_at(t) for t in (-1, 0, 99, 100, 299, 300, 399, 400)] == [
        None,
        "ka",
        "ka",
        "ka",
        "ka",
        "kc",
        "kc",
        "kd",
    ]
    assert s.status("ka", 500).state == "retired"
    assert s.status("ka", 500).signed_until_ms == 300  # it signed on while b was revoked
    until = 300 + RETIRE_SLACK_MS + MAX_VOUCHER_LIFE_MS
    assert s.status("ka", until).published and not s.status("ka", until + 1).published
    assert s.status("kb", 500).state == "revoked" and not s.status("kb", 500).published
    assert s.status("kc", 399).state == "current" and s.status("kc", 400).state == "revoked"
    assert s.status("kd", 500).state == "current"
    assert s.changes_after(500) == until + 1


def test_the_keys_directory_is_private_and_a_key_written_before_schedules_signed_at_once(
    tmp_path: Path,
) -> None:
    keys = tmp_path / "keys"
    kid = rotate_key(keys, prepublish_ms=HOUR_MS)
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in (f"{kid}.pem", f"{kid}.json"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600
    # The first key signs at once, whatever the prepublication: nothing else could.
    assert read_times(keys, kid).signs_from_ms == kid_created_ms(kid)
    revoke_key(keys, rotate_key(keys, prepublish_ms=HOUR_MS))
    assert stat.S_IMODE((keys / f"{kid}.json").stat().st_mode) == 0o600
    assert not [p for p in os.listdir(keys) if p.endswith(".tmp")]
    (keys / f"{kid}.json").unlink()  # as an older version left it
    assert read_times(keys, kid).signs_from_ms == kid_created_ms(kid)


def test_a_directory_whose_every_key_is_revoked_gets_a_new_key_that_signs(
    tmp_path: Path,
) -> None:
    signer = VoucherSigner(tmp_path)
    only = signer.kid
    # What an operator editing the schedule by hand could leave: no key signs.
    (tmp_path / f"{only}.json").write_bytes(orjson.dumps({"signs_from_ms": 0, "revoked_at_ms": 1}))
    signer.reload()
    assert signer.kid != only and only not in signer.ring.published
    assert signer.verify(signer.sign(a_voucher(int(time.time() * 1000)))).kid == signer.kid


def test_a_schedule_that_cannot_be_read_keeps_its_key_out_of_use(tmp_path: Path) -> None:
    signer = VoucherSigner(tmp_path)
    good = signer.kid
    bad = rotate_key(tmp_path)
    (tmp_path / f"{bad}.json").write_text("{not json")
    signer.reload()
    assert signer.kid == good and bad not in signer.ring.published


def test_the_prepublication_is_a_setting_of_24_hours_by_default() -> None:
    assert Settings.from_env({}).key_prepublish_s == 86_400
    assert Settings.from_env({"FLASHSALE_KEY_PREPUBLISH": "2s"}).key_prepublish_s == 2
    assert Settings.from_env({"FLASHSALE_KEY_PREPUBLISH": "36h"}).key_prepublish_s == 129_600
    with pytest.raises(SettingsError):
        Settings.from_env({"FLASHSALE_KEY_PREPUBLISH": "soon"})
