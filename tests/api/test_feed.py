"""GET /v1/redemptions over HTTP: pages, the cursor, bad parameters, concurrent redeemers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx

from tests.api.conftest import RunningApi
from tests.vouchers.helpers import auth, claim, create_deal


def _redeem(client: httpx.Client, merchant: str, token: str) -> None:
    r = client.post("/v1/redemptions", json={"token": token}, headers=auth(merchant))
    assert r.status_code == 200, r.text


def _page(client: httpx.Client, merchant: str, **params: Any) -> dict[str, Any]:
    r = client.get("/v1/redemptions", params=params, headers=auth(merchant))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert set(body) == {"redemptions", "next"} and isinstance(body["next"], str)
    return body


def test_the_feed_pages_in_acceptance_order_and_its_cursor_comes_back_on_an_empty_page(
    api: RunningApi, client: httpx.Client
) -> None:
    merchant = api.token("merchant", "m-1")
    deals = [create_deal(client, merchant) for _ in range(3)]
    vouchers = [claim(client, d["id"], api.token("user", f"u-{i}")) for i, d in enumerate(deals)]
    first = _page(client, merchant)
    assert first["redemptions"] == []
    for v in vouchers:
        _redeem(client, merchant, v["token"])
    page = _page(client, merchant, limit=2, after=first["next"])
    assert [r["voucher_id"] for r in page["redemptions"]] == [v["id"] for v in vouchers[:2]]
    item = page["redemptions"][0]
    assert set(item) == {"voucher_id", "redeemed_at", "device_id"} and item["device_id"] is None
    assert datetime.fromisoformat(item["redeemed_at"].replace("Z", "+00:00")) <= datetime.now(UTC)
    rest = _page(client, merchant, limit=2, after=page["next"])
    assert [r["voucher_id"] for r in rest["redemptions"]] == [vouchers[2]["id"]]
    empty = _page(client, merchant, after=rest["next"])
    assert empty["redemptions"] == [] and empty["next"]
    # Later, an offline log synced by a till: only what came after the cursor.
    late = claim(client, deals[0]["id"], api.token("user", "u-late"))
    entry = {"entry_id": "e-1", "token": late["token"], "redeemed_at": late["claimed_at"]}
    r = client.post(
        "/v1/redemptions/sync",
        json={"device_id": "till-2", "entries": [entry]},
        headers=auth(merchant),
    )
    assert r.json()["results"][0]["status"] == "accepted"
    newer = _page(client, merchant, after=empty["next"])
    assert newer["redemptions"] == [
        {"voucher_id": late["id"], "redeemed_at": late["claimed_at"], "device_id": "till-2"}
    ]
    # Another merchant's feed holds none of it; the feed is for merchants only.
    assert _page(client, api.token("merchant", "m-2"))["redemptions"] == []
    assert client.get("/v1/redemptions", headers=api.auth("user", "u-0")).status_code == 403
    assert client.get("/v1/redemptions").status_code == 401


def test_a_bad_after_or_limit_is_422_naming_it(api: RunningApi, client: httpx.Client) -> None:
    merchant = api.auth("merchant", "m-1")
    good = _page(client, api.token("merchant", "m-1"))["next"]
    for params, field in (
        ({"after": "not-a-cursor"}, "after"),
        ({"after": good + "A"}, "after"),
        ({"after": "%00"}, "after"),
        ({"after": "A" * 5000}, "after"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "1e3"}, "limit"),
    ):
        r = client.get("/v1/redemptions", params=params, headers=merchant)
        assert r.status_code == 422, (params, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and field in error["details"]["fields"]
    assert _page(client, api.token("merchant", "m-1"), limit=1000, after="")["redemptions"] == []


def test_pages_read_while_many_tills_redeem_concurrently_miss_and_repeat_nothing(
    api: RunningApi, client: httpx.Client
) -> None:
    """16 redeemers (online and synced offline) over 8 deals; a reader pages meanwhile."""
    merchant = api.token("merchant", "m-1")
    deals = [create_deal(client, merchant) for _ in range(8)]
    with ThreadPoolExecutor(16) as pool:
        vouchers = list(
            pool.map(
                lambda i: claim(client, deals[i % 8]["id"], api.token("user", f"c-{i}")),
                range(320),
            )
        )
    done = threading.Event()
    seen: list[str] = []

    def redeemer(n: int) -> None:
        with httpx.Client(base_url=api.url, timeout=30) as own:
            for i, v in enumerate(vouchers[n::16]):
                if i % 2:
                    _redeem(own, merchant, v["token"])
                    continue
                entry = {
                    "entry_id": f"e-{v['id']}",
                    "token": v["token"],
                    "redeemed_at": v["claimed_at"],
                }
                r = own.post(
                    "/v1/redemptions/sync",
                    headers=auth(merchant),
                    json={"device_id": f"till-{n}", "entries": [entry]},
                )
                assert r.json()["results"][0]["status"] == "accepted", r.text

    def reader() -> None:
        after = ""
        with httpx.Client(base_url=api.url, timeout=30) as own:
            while True:
                finished = done.is_set()
                page = _page(own, merchant, limit=9, after=after)
                seen.extend(r["voucher_id"] for r in page["redemptions"])
                after = page["next"]
                if finished and len(page["redemptions"]) < 9:
                    return

    read = threading.Thread(target=reader)
    read.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(redeemer, range(16)))
    done.set()
    read.join(60)
    assert not read.is_alive()
    assert len(seen) == len(set(seen)) == 320
    assert set(seen) == {v["id"] for v in vouchers}
