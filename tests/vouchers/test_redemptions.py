"""The redeem_voucher script and sync idempotency, on one Redis node and on a Cluster."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from engine import claims, redemptions
from engine.deals import create_deal
from engine.errors import AlreadyRedeemed, BacklogFull, NotYourVoucher
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms, to_rfc3339
from engine.vouchers import VoucherSigner
from tests.helpers import new_deal


async def _voucher(
    store: Store, signer: VoucherSigner, user: str = "u-1", *, redeem_days: int = 7
) -> tuple[str, str]:
    new = new_deal(5)
    new = dataclasses.replace(new, redeem_until_ms=new.ends_at_ms + redeem_days * MS_PER_DAY)
    deal = await create_deal(store, new)
    voucher = (await claims.claim(store, deal.id, user)).voucher
    return signer.sign(voucher), voucher.voucher_id


def _sync_key(signer: VoucherSigner, token: str, merchant: str = "m-1") -> str:
    """The merchant's sync hash for the month this voucher expires in."""
    return redemptions.sync_results_key(merchant, signer.verify(token).expires_at_s)


async def test_online_redemption_first_wins_and_records_the_documented_value(
    store: Store,
) -> None:
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, vid = await _voucher(store, signer)
    with pytest.raises(NotYourVoucher):
        await redemptions.redeem(store, signer, token, "m-2")
    done = await redemptions.redeem(store, signer, token, "m-1")
    assert done.voucher_id == vid and abs(done.redeemed_at_ms - now_ms()) < 5000
    with pytest.raises(AlreadyRedeemed) as refused:
        await redemptions.redeem(store, signer, token, "m-1")
    assert refused.value.details["redeemed_at"] == to_rfc3339(done.redeemed_at_ms)
    k = store.keys.for_deal(vid.split(".", 1)[1])
    # "<at_ms>|<device>|<entry>|<merchant>": device and entry are empty online.
    assert await store.client.hget(k.redemptions, vid) == f"{done.redeemed_at_ms}|||m-1"
    events = [f for _id, f in await store.client.xrange(k.events) if f["type"] == "redeem"]
    assert len(events) == 1  # the refused second attempt logged nothing


async def test_a_replayed_sync_entry_is_the_same_accepted_result(store: Store) -> None:
    """Crash between redeem and record: the entry comes again and is accepted again, once."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, vid = await _voucher(store, signer)
    at = to_rfc3339(now_ms())
    entry = {"entry_id": "e-1", "token": token, "redeemed_at": at}
    first = await redemptions.sync(store, signer, "m-1", "till-1", [entry], lambda s: True)
    exp_s = signer.verify(token).expires_at_s
    await store.client.delete(redemptions.sync_results_key("m-1", exp_s))  # the record was lost
    again = await redemptions.sync(store, signer, "m-1", "till-1", [entry], lambda s: True)
    assert first[0]["status"] == again[0]["status"] == "accepted"
    assert first[0]["first_redeemed_at"] == again[0]["first_redeemed_at"] == at
    k = store.keys.for_deal(vid.split(".", 1)[1])
    events = [f for _id, f in await store.client.xrange(k.events) if f["type"] == "redeem"]
    assert len(events) == 1
    assert {k: events[0][k] for k in ("merchant", "device", "entry", "voucher")} == {
        "merchant": "m-1",
        "device": "till-1",
        "entry": "e-1",
        "voucher": vid,
    }
    # Now recorded: a third upload is a duplicate of the first result.
    third = await redemptions.sync(store, signer, "m-1", "till-1", [entry], lambda s: True)
    assert third[0]["status"] == "duplicate" and third[0]["first_status"] == "accepted"


async def test_redemption_is_refused_when_the_stream_is_full(store: Store) -> None:
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, vid = await _voucher(store, signer)
    k = store.keys.for_deal(vid.split(".", 1)[1])
    cap = await store.client.xlen(k.events)
    full = Store(store.client, store.settings.with_(stream_cap=cap))
    with pytest.raises(BacklogFull):
        await redemptions.redeem(full, signer, token, "m-1")
    assert await store.client.hget(k.redemptions, vid) is None  # nothing half-done


async def test_the_redemption_value_is_what_redeem_voucher_lua_writes_and_reads(
    store: Store,
) -> None:
    """redemption_value / parse_redemption pair with the script, both ways."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, vid = await _voucher(store, signer)
    at = now_ms()  # not before the claim
    entry = {"entry_id": "e-1", "token": token, "redeemed_at": to_rfc3339(at)}
    (result,) = await redemptions.sync(store, signer, "m-1", "till-1", [entry], lambda s: True)
    assert result["status"] == "accepted"
    k = store.keys.for_deal(vid.split(".", 1)[1])
    written = await store.client.hget(k.redemptions, vid)
    assert written == redemptions.redemption_value(at, "till-1", "e-1", "m-1")
    assert redemptions.parse_redemption(written) == (at, "till-1", "e-1", "m-1")
    # As rebuild-redis restores a first redemption: the script reads its time and entry.
    token, vid = await _voucher(store, signer, "u-2")
    at = now_ms()
    k = store.keys.for_deal(vid.split(".", 1)[1])
    first = redemptions.redemption_value(at, "till-9", "e-9", "m-1")
    await store.client.hset(k.redemptions, vid, first)
    same = {"entry_id": "e-9", "token": token, "redeemed_at": to_rfc3339(at)}
    other = {"entry_id": "e-10", "token": token, "redeemed_at": to_rfc3339(at + 500)}
    results = await redemptions.sync(store, signer, "m-1", "till-9", [same, other], lambda s: True)
    assert [r["status"] for r in results] == ["accepted", "conflict"]
    assert {r["first_redeemed_at"] for r in results} == {to_rfc3339(at)}


def _ok(entry_id: str) -> bool:
    return True


async def test_1000_entries_with_one_token_cost_one_verification(store: Store) -> None:
    """A token sent many times in one upload is verified once, good or forged."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, _vid = await _voucher(store, signer)
    at = to_rfc3339(now_ms())
    for n, sent in enumerate((token, token[:-4] + "AAAA")):  # real, then forged
        before = signer.verifications
        entries = [{"entry_id": f"e{n}-{i}", "token": sent, "redeemed_at": at} for i in range(1000)]
        results = await redemptions.sync(store, signer, "m-1", "till-1", entries, _ok)
        assert signer.verifications - before == 1
        assert len(results) == 1000
    assert {r["code"] for r in results} == {"invalid_voucher"}


async def _sync_footprint(store: Store, key: str, events: str) -> tuple[int, int]:
    return int(await store.client.hlen(key)), int(await store.client.xlen(events))


async def test_uploads_of_new_entry_ids_for_one_voucher_cannot_grow_the_merchant_state(
    store: Store,
) -> None:
    """5 uploads of 1000 fresh entry ids naming one voucher: the merchant's sync hash
    holds at most the quota (+ the voucher's count), and the stream at most the quota's
    conflicts; an entry past the quota is answered (a conflict) but judged afresh each
    time and left nowhere, so the contract's statuses and codes are all a client sees."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, vid = await _voucher(store, signer)
    key = _sync_key(signer, token)
    events = store.keys.for_deal(vid.split(".", 1)[1]).events
    base_events = await store.client.xlen(events)
    at = to_rfc3339(now_ms())
    quota = redemptions.MAX_KEPT_PER_VOUCHER
    for upload in range(5):
        entries = [
            {"entry_id": f"u{upload}-{i}", "token": token, "redeemed_at": at} for i in range(1000)
        ]
        results = await redemptions.sync(store, signer, "m-1", "till-1", entries, _ok)
        statuses = [(r["status"], r["code"]) for r in results]
        if upload == 0:
            assert statuses[0] == ("accepted", None)
            assert statuses[1:] == [("conflict", None)] * 999
        else:
            assert set(statuses) == {("conflict", None)}
        assert {r["first_redeemed_at"] for r in results[1:]} == {results[0]["first_redeemed_at"]}
        fields, logged = await _sync_footprint(store, key, events)
        assert fields == quota + 1  # the kept entries and the voucher's count
        assert logged - base_events == quota  # 1 redeem + quota - 1 conflicts
    # Past the quota, nothing is kept: sent again, judged again the same way.
    again = await redemptions.sync(store, signer, "m-1", "till-1", entries[:3], _ok)
    assert {(r["status"], r["code"]) for r in again} == {("conflict", None)}
    # The quota is per voucher: the merchant's next voucher is served as usual.
    other, _ = await _voucher(store, signer, "u-2")
    fresh = {"entry_id": "next", "token": other, "redeemed_at": at}
    assert (await redemptions.sync(store, signer, "m-1", "t", [fresh], _ok))[0]["status"] == (
        "accepted"
    )


async def test_an_accepted_redemption_is_kept_even_past_the_quota(store: Store) -> None:
    """Kept rejections fill a voucher's quota before anyone redeemed it: the first
    redemption still goes through and is recorded (a till's honest scan is never lost)."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, _vid = await _voucher(store, signer)
    quota = redemptions.MAX_KEPT_PER_VOUCHER
    late = to_rfc3339(now_ms() + 3_600_000)  # an hour ahead: implausible_time, kept
    bad = [{"entry_id": f"b{i}", "token": token, "redeemed_at": late} for i in range(quota + 5)]
    results = await redemptions.sync(store, signer, "m-1", "till-1", bad, _ok)
    assert [r["code"] for r in results] == ["implausible_time"] * (quota + 5)
    assert await store.client.hlen(_sync_key(signer, token)) == quota + 1  # past it: not kept
    good = {"entry_id": "good", "token": token, "redeemed_at": to_rfc3339(now_ms())}
    result = (await redemptions.sync(store, signer, "m-1", "till-1", [good], _ok))[0]
    assert result["status"] == "accepted"
    again = (await redemptions.sync(store, signer, "m-1", "till-1", [good], _ok))[0]
    assert (again["status"], again["first_status"]) == ("duplicate", "accepted")
    assert await store.client.hlen(_sync_key(signer, token)) == quota + 2


async def test_one_upload_naming_vouchers_of_two_expiry_months_keeps_each_in_its_month(
    store: Store,
) -> None:
    """Results live in the hash of the month their voucher expires: an upload naming
    vouchers of two months records each in its own hash (one record_sync call per hash,
    as on a cluster the hashes share no slot), each hash expiring at its own fixed time,
    and each voucher's quota counted in its own hash."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    soon, _ = await _voucher(store, signer, redeem_days=7)
    later, _ = await _voucher(store, signer, "u-2", redeem_days=60)
    soon_key, later_key = _sync_key(signer, soon), _sync_key(signer, later)
    assert soon_key != later_key
    at = to_rfc3339(now_ms())
    quota = redemptions.MAX_KEPT_PER_VOUCHER
    entries = [
        {"entry_id": f"{name}-{i}", "token": token, "redeemed_at": at}
        for i in range(quota + 3)
        for name, token in (("s", soon), ("l", later))
    ]
    results = await redemptions.sync(store, signer, "m-1", "till-1", entries, _ok)
    assert [r["status"] for r in results[:2]] == ["accepted", "accepted"]
    assert {r["status"] for r in results[2:]} == {"conflict"}
    for key, token in ((soon_key, soon), (later_key, later)):
        voucher_id = signer.verify(token).voucher_id
        assert await store.client.hlen(key) == quota + 1  # its own entries and its count
        assert await store.client.hget(key, "#" + voucher_id) == str(quota)
        month = key.rsplit(":", 1)[1]
        expected = redemptions._month_end_ms(month) + redemptions.SYNC_RESULTS_KEPT_MS
        assert await store.client.pexpiretime(key) == expected
    again = await redemptions.sync(store, signer, "m-1", "till-1", entries[:2], _ok)
    assert [(r["status"], r["first_status"]) for r in again] == [("duplicate", "accepted")] * 2


async def test_concurrent_uploads_for_one_voucher_keep_exactly_the_quota(store: Store) -> None:
    """Four uploads at once, each with fresh entry ids for one voucher: the quota of kept
    results holds exactly (record_sync.lua decides), whatever each upload saw before."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    token, _vid = await _voucher(store, signer)
    at = to_rfc3339(now_ms())
    uploads = [
        [{"entry_id": f"c{n}-{i}", "token": token, "redeemed_at": at} for i in range(50)]
        for n in range(4)
    ]
    answers = await asyncio.gather(
        *(
            redemptions.sync(store, signer, "m-1", f"till-{n}", u, _ok)
            for n, u in enumerate(uploads)
        )
    )
    quota = redemptions.MAX_KEPT_PER_VOUCHER
    results = [r for a in answers for r in a]
    assert sum(r["status"] == "accepted" for r in results) == 1
    assert {r["status"] for r in results} == {"accepted", "conflict"}
    # The quota's conflicts and the count field, and the accepted entry, which is kept even
    # when concurrent uploads filled the quota before it was recorded.
    fields = await store.client.hgetall(_sync_key(signer, token))
    assert quota + 1 <= len(fields) <= quota + 2
    accepted = next(r["entry_id"] for r in results if r["status"] == "accepted")
    assert accepted in fields
