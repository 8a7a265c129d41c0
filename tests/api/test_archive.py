"""Every route answers the same after a deal is archived: a run of deals of a few seconds
and a grace of one second, against real servers, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import redis

from engine import feed
from engine.settings import Settings
from engine.times import now_ms, parse_rfc3339, to_rfc3339
from persister import cli
from tests.api.conftest import RunningApi
from tests.api.test_vouchers_api import decode_qr
from tests.conftest import flush
from tests.persister.conftest import (
    drop_database,
    fresh_database,
    running_persister,
    wait_caught_up,
)


def _at(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture
async def lifecycle_db(database_url: str) -> AsyncIterator[str]:
    dsn = await fresh_database(database_url)
    try:
        yield dsn
    finally:
        await drop_database(database_url, dsn)


# Keys that are not a deal's and go by themselves: the merchants' redemption feeds (one
# per merchant and partition, shared by all its deals there, so archive_deal leaves them;
# each expires with the latest voucher exp it names, here seconds away, and no sooner than
# feed.MIN_TTL_MS after its last append). Every one of them must expire within
# SELF_EXPIRING_BOUND_MS; a deal's keys, had the archiver left any, would have days to go
# (their backstop deadline is at least a week away). The API runs without rate limits
# here, so there is no limiter state.
SELF_EXPIRING = (":merchant-redemptions:",)
SELF_EXPIRING_BOUND_MS = 2 * feed.MIN_TTL_MS


def _non_merchant_keys(r: redis.Redis) -> set[str]:
    """Redis's keys but the merchants' state that is not the deals': the sync results (kept
    180 days after their vouchers' expiry month, by API.md) and the keys that expire by
    themselves soon (SELF_EXPIRING, their bound asserted here)."""
    out = set()
    for k in r.scan_iter(match="*", count=1000):
        if k.startswith("fs:sync:"):
            continue
        if any(kind in k for kind in SELF_EXPIRING):
            ttl_ms = r.pttl(k)
            assert 0 < ttl_ms <= SELF_EXPIRING_BOUND_MS, (k, ttl_ms)
            continue
        out.add(k)
    return out


async def _answers(c: httpx.AsyncClient, api: RunningApi, w: dict[str, Any]) -> dict[str, Any]:
    """What every route answers about the run's deals and vouchers (tokens by their claims:
    an ES256 signature differs on each signing)."""
    out: dict[str, Any] = {}

    def voucher(v: dict[str, Any]) -> dict[str, Any]:
        claims = jwt.decode(v["token"], options={"verify_signature": False})
        return {**{k: x for k, x in v.items() if k != "token"}, "token_claims": claims}

    for name, deal in w["deals"].items():
        r = await c.get(f"/v1/deals/{deal['id']}")
        body = r.json()
        out[f"deal {name}"] = (r.status_code, body)
        for user in ("u-1", "u-9"):
            r = await c.post(f"/v1/deals/{deal['id']}/claims", headers=api.auth("user", user))
            body = r.json()
            if "voucher" in body:
                body["voucher"] = voucher(body["voucher"])
            out[f"claim {name} {user}"] = (r.status_code, body)
    for name, v in w["vouchers"].items():
        for who in (("user", v["user_id"]), ("merchant", v["merchant_id"]), ("user", "u-9")):
            r = await c.get(f"/v1/vouchers/{v['id']}", headers=api.auth(*who))
            body = r.json()
            if "voucher" in body:
                body["voucher"] = voucher(body["voucher"])
            out[f"voucher {name} {who}"] = (r.status_code, body)
        holder = api.auth("user", v["user_id"])
        png = await c.get(f"/v1/vouchers/{v['id']}/qr.png", headers=holder)
        svg = await c.get(f"/v1/vouchers/{v['id']}/qr.svg", headers=holder)
        decoded = jwt.decode(decode_qr(png.content), options={"verify_signature": False})
        out[f"qr {name}"] = (png.status_code, svg.status_code, svg.text.startswith("<svg"), decoded)
    for user in ("u-1", "u-2"):
        r = await c.get("/v1/me/vouchers", headers=api.auth("user", user))
        body = r.json()
        body["vouchers"] = [voucher(v) for v in body["vouchers"]]
        out[f"me {user}"] = (r.status_code, body)
    a4 = w["vouchers"]["a4"]
    r = await c.post(
        "/v1/redemptions", json={"token": a4["token"]}, headers=api.auth("merchant", "m-1")
    )
    out["online a4"] = (r.status_code, r.json()["error"]["code"], r.json()["error"]["details"])
    return out


async def test_every_route_answers_the_same_after_archiving_and_redis_is_back_to_baseline(
    make_api: Callable[..., RunningApi], redis_url: str, lifecycle_db: str
) -> None:
    flush(redis_url, False)
    settings = Settings(redis_url=redis_url, database_url=lifecycle_db, archive_grace_s=1.0)
    api = make_api(settings)
    settings = api.settings
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    pg = await asyncpg.connect(lifecycle_db)
    try:
        async with (
            httpx.AsyncClient(base_url=api.url, timeout=10) as c,
            running_persister(settings) as _p,
        ):
            await asyncio.sleep(0.3)  # the persister made its streams and group
            baseline = _non_merchant_keys(r)
            ends = datetime.now(UTC) + timedelta(seconds=3)
            w: dict[str, Any] = {"deals": {}, "vouchers": {}}
            for name, merchant in (("a", "m-1"), ("b", "m-1"), ("c", "m-2")):
                body = {
                    "title": f"deal {name}",
                    "lat": 12.97,
                    "lng": 77.59,
                    "inventory": 5,
                    "ends_at": _at(ends),
                    "redeem_until": _at(ends),
                }
                resp = await c.post("/v1/deals", json=body, headers=api.auth("merchant", merchant))
                assert resp.status_code == 201, resp.text
                w["deals"][name] = resp.json()["deal"]
            claims = [
                ("a", "u-1"),
                ("a", "u-2"),
                ("a", "u-3"),
                ("a", "u-4"),
                ("b", "u-1"),
                ("b", "u-2"),
                ("c", "u-1"),
            ]
            for deal, user in claims:
                deal_id = w["deals"][deal]["id"]
                resp = await c.post(f"/v1/deals/{deal_id}/claims", headers=api.auth("user", user))
                assert resp.status_code == 201, resp.text
                w["vouchers"][f"{deal}{user[-1]}"] = resp.json()["voucher"]
            v = w["vouchers"]
            m1 = api.auth("merchant", "m-1")
            resp = await c.post("/v1/redemptions", json={"token": v["a1"]["token"]}, headers=m1)
            assert resp.status_code == 200, resp.text
            live = {
                "device_id": "till-1",
                "entries": [
                    {
                        "entry_id": "e-a2",
                        "token": v["a2"]["token"],
                        "redeemed_at": to_rfc3339(now_ms()),
                    }
                ],
            }
            resp = await c.post("/v1/redemptions/sync", json=live, headers=m1)
            assert resp.json()["results"][0]["status"] == "accepted"
            resp = await c.post(
                f"/v1/deals/{w['deals']['c']['id']}/cancel", headers=api.auth("merchant", "m-2")
            )
            assert resp.status_code == 200
            # Offline, before exp, at two tills; uploaded only after archiving.
            made_at = to_rfc3339(now_ms())
            till1 = {"entry_id": "e-a3-1", "token": v["a3"]["token"], "redeemed_at": made_at}
            till2 = {
                "entry_id": "e-a3-2",
                "token": v["a3"]["token"],
                "redeemed_at": to_rfc3339(parse_rfc3339(made_at) + 1),
            }

            # Past redeem_until + the grace, everything persisted: the answers before.
            due = parse_rfc3339(w["deals"]["a"]["redeem_until"]) + 1000
            await asyncio.sleep(max(0.0, (due - now_ms()) / 1000) + 0.3)
            await wait_caught_up(_p.store)
            before = await _answers(c, api, w)
            assert before["deal a"][1]["deal"]["status"] == "ended"
            assert before["claim c u-9"][0] == 409
            assert before["online a4"][:2] == (422, "invalid_voucher")

            assert await cli.archive(settings, dry_run=False) == 0
            ids = sorted(d["id"] for d in w["deals"].values())
            archived = await pg.fetch("SELECT id FROM deals WHERE archived_at IS NOT NULL")
            assert sorted(x["id"] for x in archived) == ids
            assert _non_merchant_keys(r) == baseline
            assert await pg.fetchval("SELECT count(*) FROM vouchers") == len(claims)
            assert await pg.fetchval("SELECT count(*) FROM redemptions") == 2

            after = await _answers(c, api, w)
            assert after == before

            # Late uploads, decided in PostgreSQL as Redis would have.
            m1_sync = {"device_id": "till-1", "entries": [till1]}
            m2_sync = {"device_id": "till-2", "entries": [till2]}
            first = (await c.post("/v1/redemptions/sync", json=m1_sync, headers=m1)).json()
            second = (await c.post("/v1/redemptions/sync", json=m2_sync, headers=m1)).json()
            again = (await c.post("/v1/redemptions/sync", json=m1_sync, headers=m1)).json()
            assert first["results"][0]["status"] == "accepted"
            assert first["results"][0]["first_redeemed_at"] == made_at
            assert second["results"][0]["status"] == "conflict"
            assert second["results"][0]["first_redeemed_at"] == made_at
            assert again["results"][0]["status"] == "duplicate"
            resp = await c.get(f"/v1/vouchers/{v['a3']['id']}", headers=m1)
            assert resp.json()["status"] == "redeemed"
            row = await pg.fetchrow(
                "SELECT * FROM redemptions WHERE voucher_id = $1", v["a3"]["id"]
            )
            assert (row["merchant_id"], row["device_id"], row["entry_id"]) == (
                "m-1",
                "till-1",
                "e-a3-1",
            )
            conflicts = await pg.fetch("SELECT entry_id FROM redemption_conflicts")
            assert [x["entry_id"] for x in conflicts] == ["e-a3-2"]

            metrics = (await c.get("/metrics")).text
            assert "flashsale_deals_archived 3.0" in metrics
            assert "flashsale_deals_due 0.0" in metrics
    finally:
        await pg.close()
        r.close()
