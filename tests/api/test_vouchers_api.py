"""Vouchers over HTTP: tokens, JWKS, reading, QR codes, online redemption and sync."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
import redis
import zxingcpp
from PIL import Image

from engine.keys import KeySpace
from engine.redemptions import MAX_KEPT_PER_VOUCHER, sync_results_key
from engine.times import parse_rfc3339
from engine.vouchers import rotate_key
from tests.api.conftest import RunningApi
from tests.vouchers.forge import forgeries, high_s, parts, public_pem, resign
from tests.vouchers.helpers import auth, claim, create_deal, server_key, verify_with_jwks


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _now(delta_s: float = 0) -> str:
    return _iso(datetime.now(UTC) + timedelta(seconds=delta_s))


@pytest.fixture
def voucher(api: RunningApi, client: httpx.Client) -> dict[str, Any]:
    deal = create_deal(client, api.token("merchant", "m-1"))
    return claim(client, deal["id"], api.token("user", "u-1"))


def _redeem(client: httpx.Client, api: RunningApi, token: str, merchant: str = "m-1") -> Any:
    return client.post(
        "/v1/redemptions", json={"token": token}, headers=api.auth("merchant", merchant)
    )


def test_voucher_token_is_es256_with_kid_typ_and_the_documented_claims(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    header, _payload, sig = parts(voucher["token"])
    assert header["alg"] == "ES256" and header["typ"] == "vch+jwt" and header["kid"]
    assert len(sig) == 64
    claims = verify_with_jwks(client, voucher["token"], "m-1")
    assert claims["iss"] == "flashsale" and claims["aud"] == "m-1" and claims["sub"] == "u-1"
    assert claims["jti"] == voucher["id"] and claims["deal"] == voucher["deal_id"]
    assert claims["exp"] == int(
        datetime.fromisoformat(voucher["expires_at"].replace("Z", "+00:00")).timestamp()
    )


def test_jwks_is_public_cacheable_and_holds_no_private_key(client: httpx.Client) -> None:
    r = client.get("/.well-known/jwks.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert "max-age=" in r.headers["cache-control"] and r.headers["etag"]
    keys = r.json()["keys"]
    assert keys and all(k["kty"] == "EC" and k["crv"] == "P-256" for k in keys)
    assert all("d" not in k for k in keys)
    again = client.get("/.well-known/jwks.json", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_get_voucher_for_holder_and_merchant_only(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    url = f"/v1/vouchers/{voucher['id']}"
    mine = client.get(url, headers=api.auth("user", "u-1"))
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["status"] == "issued" and body["voucher"]["id"] == voucher["id"]
    assert body["voucher"]["claimed_at"] == voucher["claimed_at"]
    # A fresh signature over the same claims: the same voucher.
    assert verify_with_jwks(client, body["voucher"]["token"], "m-1")["jti"] == voucher["id"]
    assert client.get(url, headers=api.auth("merchant", "m-1")).status_code == 200
    for who in (api.auth("user", "u-2"), api.auth("merchant", "m-2"), api.auth("admin", "u-1")):
        r = client.get(url, headers=who)
        assert r.status_code == 404 and r.json()["error"]["code"] == "voucher_not_found"
    for bad in ("vdeadbeefdeadbeef.d_nope", "nonsense", "v" + "x" * 80):
        r = client.get(f"/v1/vouchers/{bad}", headers=api.auth("user", "u-1"))
        assert r.status_code == 404 and r.json()["error"]["code"] == "voucher_not_found"
    assert client.get(url).status_code == 401
    assert _redeem(client, api, voucher["token"]).status_code == 200
    assert client.get(url, headers=api.auth("user", "u-1")).json()["status"] == "redeemed"


def test_forged_tokens_are_refused_online(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    key = server_key(api.settings.signing_keys_dir)
    table = forgeries(voucher["token"], public_pem(key), key, api.token("merchant", "m-1"))
    for name, forge in table.items():
        r = _redeem(client, api, forge())
        assert r.status_code == 422, (name, r.text)
        assert r.json()["error"]["code"] == "invalid_voucher", (name, r.text)
    # None of them redeemed it: the real token still does, with scanner noise around it.
    r = _redeem(client, api, f"  {voucher['token']}\n")
    assert r.status_code == 200, r.text
    assert r.json()["redemption"]["voucher_id"] == voucher["id"]
    assert r.json()["redemption"]["status"] == "redeemed"


def test_wrong_audience_and_expired_are_refused_online(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    r = _redeem(client, api, voucher["token"], merchant="m-2")
    assert r.status_code == 403 and r.json()["error"]["code"] == "not_your_voucher"
    key = server_key(api.settings.signing_keys_dir)
    expired = resign(voucher["token"], key, exp=int(time.time()) - 60)
    r = _redeem(client, api, expired)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_voucher"
    assert r.json()["error"]["details"]["reason"] == "expired"
    # A validly signed voucher that was never issued is not redeemable either.
    ghost = resign(voucher["token"], key, sub="u-ghost")
    assert _redeem(client, api, ghost).json()["error"]["code"] == "invalid_voucher"


def test_reencoded_signature_is_the_same_voucher(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    twin = high_s(voucher["token"])
    assert twin != voucher["token"]
    assert verify_with_jwks(client, twin, "m-1")["jti"] == voucher["id"]  # still valid
    first = _redeem(client, api, voucher["token"])
    assert first.status_code == 200
    r = _redeem(client, api, twin)
    assert r.status_code == 409 and r.json()["error"]["code"] == "already_redeemed"
    assert r.json()["error"]["details"]["redeemed_at"] == first.json()["redemption"]["redeemed_at"]


def _sync(client: httpx.Client, api: RunningApi, device: str, entries: list[Any]) -> Any:
    r = client.post(
        "/v1/redemptions/sync",
        json={"device_id": device, "entries": entries},
        headers=api.auth("merchant", "m-1"),
    )
    assert r.status_code == 200, r.text
    return r.json()["results"]


def test_sync_batch_with_every_status_is_idempotent(api: RunningApi, client: httpx.Client) -> None:
    m1 = api.token("merchant", "m-1")
    deal = create_deal(client, m1)
    other = create_deal(client, api.token("merchant", "m-2"))
    v = [claim(client, deal["id"], api.token("user", f"u-{i}")) for i in range(5)]
    foreign = claim(client, other["id"], api.token("user", "u-0"))
    key = server_key(api.settings.signing_keys_dir)
    expired = resign(v[3]["token"], key, exp=int(time.time()) - 30)
    assert (
        _sync(
            client,
            api,
            "till-1",
            [{"entry_id": "e0", "token": v[0]["token"], "redeemed_at": _now()}],
        )[0]["status"]
        == "accepted"
    )
    entries: list[Any] = [
        {"entry_id": "e0", "token": v[0]["token"], "redeemed_at": _now()},  # sent before
        {"entry_id": "e1", "token": v[1]["token"], "redeemed_at": _now()},
        {"entry_id": "e2", "token": high_s(v[0]["token"]), "redeemed_at": _now()},
        {"token": v[2]["token"], "redeemed_at": _now()},
        {"entry_id": "e4", "token": v[2]["token"][:-3], "redeemed_at": _now()},
        {"entry_id": "e5", "token": foreign["token"], "redeemed_at": _now()},
        {"entry_id": "e6", "token": expired, "redeemed_at": _now()},
        {"entry_id": "e7", "token": v[4]["token"], "redeemed_at": _now(3600)},
        {"entry_id": "e8", "token": v[4]["token"], "redeemed_at": "2020-01-01T00:00:00Z"},
        {"entry_id": "e9", "token": v[2]["token"], "redeemed_at": "yesterday"},
        "not an object",
        {"entry_id": "e1", "token": v[1]["token"], "redeemed_at": _now()},  # twice in batch
    ]
    results = _sync(client, api, "till-2", entries)
    got = [(r["status"], r["code"]) for r in results]
    assert got == [
        ("duplicate", None),
        ("accepted", None),
        ("conflict", None),
        ("rejected", "missing_entry_id"),
        ("rejected", "invalid_voucher"),
        ("rejected", "not_your_voucher"),
        ("rejected", "expired"),
        ("rejected", "implausible_time"),
        ("rejected", "implausible_time"),
        ("rejected", "implausible_time"),
        ("rejected", "missing_entry_id"),
        ("duplicate", None),
    ]
    assert [r["entry_id"] for r in results][:3] == ["e0", "e1", "e2"]
    assert results[0]["first_status"] == "accepted"
    assert results[2]["first_redeemed_at"] == results[0]["first_redeemed_at"]
    # Re-sent as a whole: an entry that named a voucher of this merchant is a duplicate,
    # with its first result; one refused before that is judged afresh, the same way.
    again = _sync(client, api, "till-2", entries)
    for first, second in zip(results, again, strict=True):
        if first["code"] in ("missing_entry_id", "invalid_voucher", "not_your_voucher"):
            assert (second["status"], second["code"]) == ("rejected", first["code"])
        elif first["status"] != "duplicate":
            assert second["status"] == "duplicate", (first, second)
            assert (second["first_status"], second["first_code"]) == (
                first["status"],
                first["code"],
            )
    # The online view agrees: v1 redeemed, v2 (only refused entries) still issued.
    mine = client.get(f"/v1/vouchers/{v[1]['id']}", headers=auth(m1)).json()
    assert mine["status"] == "redeemed"
    assert client.get(f"/v1/vouchers/{v[2]['id']}", headers=auth(m1)).json()["status"] == "issued"


def _at(voucher: dict[str, Any], delta: timedelta) -> str:
    """The voucher's claim time moved by ``delta``, as a till would stamp it."""
    return _iso(datetime.fromisoformat(voucher["claimed_at"].replace("Z", "+00:00")) + delta)


def test_sync_allows_5_minutes_of_device_clock_drift_either_way(
    api: RunningApi, client: httpx.Client
) -> None:
    """A till's clock may run up to 5 minutes slow or fast; more is implausible_time."""
    deal = create_deal(client, api.token("merchant", "m-1"))
    v = [claim(client, deal["id"], api.token("user", f"u-{i}")) for i in range(6)]
    minute, ms = timedelta(minutes=1), timedelta(milliseconds=1)
    stamped = [
        _at(v[0], -2 * minute),  # a slow clock: before the claim
        _at(v[1], -5 * minute),  # the edge
        _at(v[2], -5 * minute - ms),
        _at(v[3], -10 * minute),
        _now(4 * 60),  # a fast clock: ahead of the server's
        _now(6 * 60),
    ]
    entries = [
        {"entry_id": f"e{i}", "token": x["token"], "redeemed_at": at}
        for i, (x, at) in enumerate(zip(v, stamped, strict=True))
    ]
    results = _sync(client, api, "till-1", entries)
    assert [(r["status"], r["code"]) for r in results] == [
        ("accepted", None),
        ("accepted", None),
        ("rejected", "implausible_time"),
        ("rejected", "implausible_time"),
        ("accepted", None),
        ("rejected", "implausible_time"),
    ]
    # An accepted time is the device's own, even when it is before the claim.
    assert results[0]["first_redeemed_at"] == stamped[0]
    # Online redemptions are judged by the server's clock: the drift plays no part.
    assert _redeem(client, api, v[2]["token"]).status_code == 200


def test_a_malformed_redeemed_at_rejects_only_its_entry(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    now = datetime.now(UTC)
    spellings: list[Any] = [
        now.strftime("%G-W%V-%uT%H:%M:%SZ"),  # week date
        now.strftime("%Y%m%dT%H%M%SZ"),  # basic format
        now.strftime("%Y-%m-%dT%HZ"),  # hour only
        now.strftime("%Y-%m-%dT%H:%M:%S,5Z"),  # comma fraction
        (now + timedelta(hours=5)).strftime("%Y-%m-%dT%H:%M:%S+05"),
        (now + timedelta(hours=5, minutes=30)).strftime("%Y-%m-%dT%H:%M:%S+0530"),
        now.strftime("%Y-%m-%dT%H:%M:%S"),  # no zone
        now.strftime("%Y-%m-%d"),  # date only
        1764007200,
        None,
    ]
    entries: list[Any] = [
        {"entry_id": f"e{i}", "token": voucher["token"], "redeemed_at": at}
        for i, at in enumerate(spellings)
    ]
    entries.append({"entry_id": "e-missing", "token": voucher["token"]})
    entries.append({"entry_id": "e-good", "token": voucher["token"], "redeemed_at": _now()})
    results = _sync(client, api, "till-1", entries)
    refused = [("rejected", "implausible_time")] * (len(spellings) + 1)
    assert [(r["status"], r["code"]) for r in results] == [*refused, ("accepted", None)]
    assert "RFC 3339" in results[0]["message"]


def _sync_state(r: redis.Redis, api: RunningApi) -> dict[str, Any]:
    """What an upload could leave in Redis: keys, sync hashes and their fields, events."""
    return {
        "keys": r.dbsize(),
        "sync_hashes": {k: r.hlen(k) for k in r.scan_iter(match="fs:sync:*", count=1000)},
        "events": sum(r.xlen(k) for k in KeySpace(api.settings.partitions).all_events()),
    }


def _entries(r: redis.Redis, key: str) -> list[str]:
    """The entry ids a sync hash keeps (without its per-voucher counts, ``#<voucher>``)."""
    return sorted(f for f in r.hkeys(key) if not f.startswith("#"))


def test_uploads_of_garbage_leave_the_merchants_sync_state_as_it_was(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    """5 uploads of 1000 entries with garbage tokens (and one of another merchant's
    voucher) record nothing: the merchant's sync hash keeps its one real entry."""
    real = {"entry_id": "real", "token": voucher["token"], "redeemed_at": _now()}
    assert _sync(client, api, "till-1", [real])[0]["status"] == "accepted"
    r = redis.Redis.from_url(api.settings.redis_url or "", decode_responses=True)
    try:
        before = _sync_state(r, api)
        # The real entry and its voucher's count of kept entries, in the hash of the
        # month the voucher expires.
        exp_s = parse_rfc3339(voucher["expires_at"]) // 1000
        assert before["sync_hashes"] == {sync_results_key("m-1", exp_s): 2}
        for upload in range(5):
            garbage = [
                {"entry_id": f"g{upload}-{i}", "token": f"garbage.{i}.x", "redeemed_at": _now()}
                for i in range(1000)
            ]
            results = _sync(client, api, "till-1", garbage)
            assert {(x["status"], x["code"]) for x in results} == {("rejected", "invalid_voucher")}
        other = create_deal(client, api.token("merchant", "m-2"))
        foreign = claim(client, other["id"], api.token("user", "u-1"))["token"]
        before = _sync_state(r, api)  # the other merchant's deal and claim are not the upload's
        entries = [
            {"entry_id": f"f{i}", "token": foreign, "redeemed_at": _now()} for i in range(1000)
        ]
        results = _sync(client, api, "till-1", entries)
        assert {(x["status"], x["code"]) for x in results} == {("rejected", "not_your_voucher")}
        assert _sync_state(r, api) == before
    finally:
        r.close()


def test_entries_refused_before_naming_a_voucher_are_judged_afresh_and_leave_nothing(
    api: RunningApi, client: httpx.Client
) -> None:
    deal = create_deal(client, api.token("merchant", "m-1"))
    mine, late = (claim(client, deal["id"], api.token("user", u)) for u in ("u-1", "u-2"))
    other = create_deal(client, api.token("merchant", "m-2"))
    foreign = claim(client, other["id"], api.token("user", "u-1"))
    key = sync_results_key("m-1", parse_rfc3339(mine["expires_at"]) // 1000)
    r = redis.Redis.from_url(api.settings.redis_url or "", decode_responses=True)
    try:
        before = _sync_state(r, api)
        refused = [
            {"entry_id": "e-1", "token": foreign["token"], "redeemed_at": _now()},
            {"entry_id": "e-2", "token": mine["token"][:-3], "redeemed_at": _now()},
            {"token": mine["token"], "redeemed_at": _now()},
            {"entry_id": "not url-safe", "token": mine["token"], "redeemed_at": _now()},
        ]
        codes = ["not_your_voucher", "invalid_voucher", "missing_entry_id", "missing_entry_id"]
        for _ in range(2):  # sent twice: the same verdicts, never a duplicate
            results = _sync(client, api, "till-1", refused)
            assert [(x["status"], x["code"]) for x in results] == [("rejected", c) for c in codes]
            assert _sync_state(r, api) == before and not r.exists(key)
        # The till scanned the wrong code under e-1, then the right one: judged afresh.
        right = {"entry_id": "e-1", "token": mine["token"], "redeemed_at": _now()}
        assert _sync(client, api, "till-1", [right])[0]["status"] == "accepted"
        assert _entries(r, key) == ["e-1"]
        again = _sync(client, api, "till-1", [right])[0]
        assert (again["status"], again["first_status"]) == ("duplicate", "accepted")
        # A rejection that named this merchant's voucher is kept: its first result stands.
        early = {
            "entry_id": "e-3",
            "token": late["token"],
            "redeemed_at": _at(late, -timedelta(hours=1)),
        }
        assert _sync(client, api, "till-1", [early])[0]["code"] == "implausible_time"
        fixed = _sync(client, api, "till-1", [{**early, "redeemed_at": _now()}])[0]
        assert (fixed["status"], fixed["first_code"]) == ("duplicate", "implausible_time")
        assert _entries(r, key) == ["e-1", "e-3"]
    finally:
        r.close()


def test_one_voucher_on_two_offline_tills_is_one_accepted_and_one_conflict(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    results: dict[str, Any] = {}

    def upload(device: str) -> None:
        with httpx.Client(base_url=api.url, timeout=10) as c:
            results[device] = _sync(
                c,
                api,
                device,
                [{"entry_id": f"{device}-1", "token": voucher["token"], "redeemed_at": _now()}],
            )[0]

    threads = [threading.Thread(target=upload, args=(d,)) for d in ("till-a", "till-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == ["accepted", "conflict"]
    first = next(r for r in results.values() if r["status"] == "accepted")
    conflict = next(r for r in results.values() if r["status"] == "conflict")
    assert conflict["first_redeemed_at"] == first["first_redeemed_at"]
    # The persister gets both: one redeem and one redeem_conflict event in the partition.
    r = redis.Redis.from_url(api.settings.redis_url or "", decode_responses=True)
    try:
        k = KeySpace(api.settings.partitions).for_deal(voucher["deal_id"])
        events = [f for _id, f in r.xrange(k.events) if f["type"].startswith("redeem")]
    finally:
        r.close()
    assert sorted(e["type"] for e in events) == ["redeem", "redeem_conflict"]
    conflict_event = next(e for e in events if e["type"] == "redeem_conflict")
    assert conflict_event["voucher"] == voucher["id"] and conflict_event["merchant"] == "m-1"
    assert set(conflict_event) == {
        "type",
        "deal",
        "voucher",
        "merchant",
        "at",
        "device",
        "entry",
        "first_at",
    }
    # Online, the voucher is now taken.
    assert _redeem(client, api, voucher["token"]).status_code == 409


def test_sync_takes_1000_entries_and_refuses_1001(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    entry = {"token": voucher["token"], "redeemed_at": _now()}
    many = [{**entry, "entry_id": f"e{i}"} for i in range(1001)]
    r = client.post(
        "/v1/redemptions/sync",
        json={"device_id": "t", "entries": many},
        headers=api.auth("merchant", "m-1"),
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "entries" in r.json()["error"]["details"]["fields"]
    results = _sync(client, api, "t", many[:1000])  # over 64 KiB: the sync route allows it
    quota = MAX_KEPT_PER_VOUCHER
    # Past the voucher's quota of kept entries, an entry is answered but not remembered.
    assert [x["status"] for x in results] == ["accepted"] + ["conflict"] * 999
    assert {x["code"] for x in results} == {None}
    r = redis.Redis.from_url(api.settings.redis_url or "", decode_responses=True)
    try:
        key = sync_results_key("m-1", parse_rfc3339(voucher["expires_at"]) // 1000)
        assert r.hlen(key) == quota + 1  # the kept entries, their count
    finally:
        r.close()
    bad = client.post(
        "/v1/redemptions/sync",
        json={"device_id": "a b", "entries": []},
        headers=api.auth("merchant", "m-1"),
    )
    assert bad.status_code == 422
    assert (
        client.post(
            "/v1/redemptions/sync",
            json={"device_id": "t", "entries": []},
            headers=api.auth("user", "u-1"),
        ).status_code
        == 403
    )


def test_rotation_reaches_the_running_api_and_old_vouchers_keep_working(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    old_kid = jwt.get_unverified_header(voucher["token"])["kid"]
    new_kid = rotate_key(api.settings.signing_keys_dir)
    deadline = time.monotonic() + 10
    n = 0
    while True:
        n += 1
        after = claim(client, voucher["deal_id"], api.token("user", f"after-{n}"))
        if jwt.get_unverified_header(after["token"])["kid"] == new_kid:
            break
        assert time.monotonic() < deadline, "the API did not sign with the new key in 10 s"
        time.sleep(0.5)
    kids = {k["kid"] for k in client.get("/.well-known/jwks.json").json()["keys"]}
    assert {old_kid, new_kid} <= kids
    for v in (voucher, after):
        assert verify_with_jwks(client, v["token"], "m-1")["jti"] == v["id"]
        assert _redeem(client, api, v["token"]).status_code == 200


def test_png_qr_code_decodes_to_the_voucher(
    api: RunningApi, client: httpx.Client, voucher: dict[str, Any]
) -> None:
    url = f"/v1/vouchers/{voucher['id']}/qr"
    svg = client.get(url + ".svg", headers=api.auth("user", "u-1"))
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content
    assert client.get(url + ".png", headers=api.auth("merchant", "m-1")).status_code == 404
    png = client.get(url + ".png", headers=api.auth("user", "u-1"))
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    decoded = decode_qr(png.content)
    # The same header and claims as the voucher's token; ES256 signs afresh each time.
    assert decoded.rsplit(".", 1)[0] == voucher["token"].rsplit(".", 1)[0]
    assert verify_with_jwks(client, decoded, "m-1")["jti"] == voucher["id"]
    # What the till scans redeems the voucher.
    assert _redeem(client, api, decoded).status_code == 200


def decode_qr(png: bytes) -> str:
    """Decode the one QR code in a PNG with zxing-cpp (a wheel: no system library)."""
    with Image.open(io.BytesIO(png)) as image:
        (symbol,) = zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)
    return str(symbol.text)


def test_sync_with_a_full_stream_answers_503_not_500(
    make_api: Any, own_redis: Any, migrated_database_url: str
) -> None:
    """The stream at its cap refuses redemptions with 503 in a sync too (never a 500)."""
    from engine.settings import Settings

    api = make_api(
        Settings(
            redis_url=own_redis.url, database_url=migrated_database_url, stream_cap=4, partitions=1
        )
    )
    with httpx.Client(base_url=api.url, timeout=10) as client:
        deal = create_deal(client, api.token("merchant", "m-1"))  # event 1
        v = [claim(client, deal["id"], api.token("user", f"u-{i}")) for i in range(3)]  # 2-4
        entries = [
            {"entry_id": f"e{i}", "token": x["token"], "redeemed_at": _now()}
            for i, x in enumerate(v)
        ]
        r = client.post(
            "/v1/redemptions/sync",
            json={"device_id": "till-1", "entries": entries},
            headers=api.auth("merchant", "m-1"),
        )
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable" and "Retry-After" in r.headers
        r = _redeem(client, api, v[0]["token"])
        assert r.status_code == 503
