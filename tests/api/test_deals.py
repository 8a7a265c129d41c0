"""Deal and claim routes over a real socket: the contract of API.md, end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import httpx

from engine.settings import Settings
from flashsale.embedded import EmbeddedRedis
from tests.api.conftest import RunningApi


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def create(api: RunningApi, client: httpx.Client, merchant: str = "m-1", **fields: Any) -> dict:
    now = datetime.now(UTC)
    body = {
        "title": "espresso",
        "lat": 12.97,
        "lng": 77.59,
        "inventory": 3,
        "ends_at": iso(now + timedelta(hours=1)),
        **fields,
    }
    r = client.post("/v1/deals", json=body, headers=api.auth("merchant", merchant))
    assert r.status_code == 201, r.text
    return r.json()["deal"]  # type: ignore[no-any-return]


def test_create_applies_defaults_and_null_means_absent(
    api: RunningApi, client: httpx.Client
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)
    d = create(api, client, description=None, starts_at=None, redeem_until=None)
    starts = datetime.fromisoformat(d["starts_at"].replace("Z", "+00:00"))
    ends = datetime.fromisoformat(d["ends_at"].replace("Z", "+00:00"))
    redeem = datetime.fromisoformat(d["redeem_until"].replace("Z", "+00:00"))
    assert before <= starts <= datetime.now(UTC) + timedelta(seconds=2)
    assert redeem - ends == timedelta(days=7)
    assert d["description"] == "" and d["status"] == "active"
    assert d["inventory_total"] == d["inventory_left"] == 3
    assert all(d[k].endswith("Z") for k in ("starts_at", "ends_at", "redeem_until"))


def test_zone_offsets_are_normalised_to_utc(api: RunningApi, client: httpx.Client) -> None:
    d = create(
        api, client, starts_at="2099-01-01T05:30:00+05:30", ends_at="2099-01-01T02:00:00.250+01:00"
    )
    assert d["starts_at"] == "2099-01-01T00:00:00.000Z"
    assert d["ends_at"] == "2099-01-01T01:00:00.250Z"
    assert d["status"] == "scheduled"


def test_claim_then_retry_then_sold_out(api: RunningApi, client: httpx.Client) -> None:
    d = create(api, client, inventory=1)
    first = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1"))
    assert first.status_code == 201, first.text
    v = first.json()["voucher"]
    assert first.json()["inventory_left"] == 0
    assert (v["deal_id"], v["user_id"], v["merchant_id"]) == (d["id"], "u-1", "m-1")
    assert v["qr_url"] == f"/v1/vouchers/{v['id']}/qr.svg"
    assert v["expires_at"] == d["redeem_until"]
    assert v["token"].count(".") == 2
    retry = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1"))
    assert retry.status_code == 200 and retry.json()["voucher"]["id"] == v["id"]
    other = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-2"))
    assert other.status_code == 409 and other.json()["error"]["code"] == "sold_out"
    assert client.get(f"/v1/deals/{d['id']}").json()["deal"]["status"] == "sold_out"


def test_cancel_is_for_the_owner_and_stops_claims(api: RunningApi, client: httpx.Client) -> None:
    d = create(api, client, merchant="m-1")
    held = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1")).json()
    r = client.post(f"/v1/deals/{d['id']}/cancel", headers=api.auth("merchant", "m-2"))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = client.post(f"/v1/deals/{d['id']}/cancel", headers=api.auth("merchant", "m-1"))
    assert r.status_code == 200 and r.json()["deal"]["status"] == "cancelled"
    r = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-2"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "cancelled"
    again = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1"))
    assert again.status_code == 200
    assert again.json()["voucher"]["id"] == held["voucher"]["id"]


def test_scheduled_deal_refuses_claims(api: RunningApi, client: httpx.Client) -> None:
    start = datetime.now(UTC) + timedelta(hours=1)
    d = create(api, client, starts_at=iso(start), ends_at=iso(start + timedelta(hours=1)))
    r = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_started"


def test_metrics_count_requests_and_claim_outcomes(api: RunningApi, client: httpx.Client) -> None:
    d = create(api, client, inventory=1)
    client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1"))
    client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-2"))
    text = client.get("/metrics").text
    assert 'flashsale_claims_total{outcome="claimed"} 1.0' in text
    assert 'flashsale_claims_total{outcome="sold_out"} 1.0' in text
    assert 'route="/v1/deals/{deal_id}/claims"' in text
    assert "flashsale_http_request_duration_seconds_bucket" in text


def test_readyz_reports_both_stores(client: httpx.Client) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"redis": "ok", "postgres": "ok"}
    assert isinstance(body["stream_lag"], int)


def test_redis_stopped_claims_answer_503_fast_then_recover(
    make_api: Callable[..., RunningApi], own_redis: EmbeddedRedis, database_url: str
) -> None:
    """Redis really stopped: 503 + Retry-After in under 2 s; restarted: claims work again."""
    api = make_api(Settings(redis_url=own_redis.url, database_url=database_url))
    with httpx.Client(base_url=api.url, timeout=10) as client:
        d = create(api, client, inventory=5)
        assert (
            client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-1")).status_code
            == 201
        )
        own_redis.stop()
        for user in ("u-2", "u-3"):
            t0 = time.monotonic()
            r = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", user))
            assert time.monotonic() - t0 < 2.0
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable"
            assert int(r.headers["Retry-After"]) >= 1
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["redis"] == "down"
        r = client.post(
            "/v1/deals",
            json={
                "title": "x",
                "lat": 1,
                "lng": 1,
                "inventory": 1,
                "ends_at": "2099-01-01T00:00:00Z",
                "starts_at": "2098-12-31T00:00:00Z",
            },
            headers=api.auth("merchant", "m-1"),
        )
        assert r.status_code == 503
        own_redis.start()
        r = client.post(f"/v1/deals/{d['id']}/claims", headers=api.auth("user", "u-2"))
        assert r.status_code == 201, r.text
        assert r.json()["inventory_left"] == 3
        assert client.get("/readyz").json()["checks"]["redis"] == "ok"


def test_http_race_thousands_of_callers_get_exactly_the_inventory(
    api: RunningApi, client: httpx.Client
) -> None:
    """5,000 distinct callers, concurrently over 200 connections, for 100 vouchers."""
    d = create(api, client, inventory=100)
    tokens = [api.token("user", f"u-{i}") for i in range(5000)]

    async def storm() -> list[tuple[int, dict[str, Any]]]:
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(api.url, connector=connector) as session:

            async def one(token: str) -> tuple[int, dict[str, Any]]:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.post(f"/v1/deals/{d['id']}/claims", headers=headers) as r:
                    return r.status, await r.json()

            return await asyncio.gather(*(one(t) for t in tokens))

    responses = asyncio.run(storm())
    statuses = [status for status, _ in responses]
    assert statuses.count(201) == 100
    assert statuses.count(409) == 4900
    assert {b["error"]["code"] for s, b in responses if s == 409} == {"sold_out"}
    winners = [b["voucher"] for s, b in responses if s == 201]
    assert len({v["user_id"] for v in winners}) == 100
    assert len({v["id"] for v in winners}) == 100
    assert client.get(f"/v1/deals/{d['id']}").json()["deal"]["inventory_left"] == 0
