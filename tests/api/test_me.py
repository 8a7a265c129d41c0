"""GET /v1/me/vouchers: the caller's persisted vouchers, newest first, paginated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from engine import claims
from engine.deals import create_deal
from engine.settings import Settings
from engine.store import Store
from tests.api.conftest import RunningApi
from tests.conftest import flush
from tests.helpers import new_deal
from tests.persister.conftest import (
    drop_database,
    fresh_database,
    running_persister,
    wait_caught_up,
)


@pytest.fixture
async def me_setup(
    make_api: Callable[..., RunningApi], redis_url: str, database_url: str, tmp_path: Path
) -> AsyncIterator[tuple[RunningApi, Store, str]]:
    flush(redis_url, False)
    dsn = await fresh_database(database_url)
    api = make_api(Settings(redis_url=redis_url, database_url=dsn, partitions=4))
    store = await Store.connect(api.settings)
    try:
        yield api, store, dsn
    finally:
        await store.close()
        await drop_database(database_url, dsn)


async def test_my_vouchers_newest_first_with_cursor_and_status(
    me_setup: tuple[RunningApi, Store, str],
) -> None:
    api, store, dsn = me_setup
    deals = [await create_deal(store, new_deal(5, merchant_id=f"m-{i}")) for i in range(5)]
    mine = []
    for d in deals:
        mine.append((await claims.claim(store, d.id, "u-1")).voucher)
        await claims.claim(store, d.id, "u-2")
        await asyncio.sleep(0.003)  # distinct claimed_at
    async with running_persister(api.settings):
        await wait_caught_up(store)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO redemptions (voucher_id, deal_id, merchant_id, redeemed_at) "
            "VALUES ($1, $2, 'm-1', now())",
            mine[1].voucher_id,
            deals[1].id,
        )
    finally:
        await conn.close()
    seen = []
    cursor = None
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as client:
        for _ in range(3):
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            r = await client.get("/v1/me/vouchers", params=params, headers=api.auth("user", "u-1"))
            assert r.status_code == 200, r.text
            body = r.json()
            seen += body["vouchers"]
            cursor = body["next_cursor"]
        assert cursor is None
        assert [v["id"] for v in seen] == [c.voucher_id for c in reversed(mine)]
        by_id = {v["id"]: v for v in seen}
        assert by_id[mine[1].voucher_id]["status"] == "redeemed"
        assert {v["status"] for v in seen if v["id"] != mine[1].voucher_id} == {"issued"}
        v = by_id[mine[3].voucher_id]
        assert (v["deal_id"], v["user_id"], v["merchant_id"]) == (deals[3].id, "u-1", "m-3")
        assert v["qr_url"] == f"/v1/vouchers/{mine[3].voucher_id}/qr.svg"
        claims_in_token = jwt.decode(v["token"], options={"verify_signature": False})
        assert (claims_in_token["jti"], claims_in_token["aud"]) == (mine[3].voucher_id, "m-3")
        # Refusals: no token, wrong role, bad limit, forged cursor.
        assert (await client.get("/v1/me/vouchers")).status_code == 401
        merchant = api.auth("merchant", "m-1")
        assert (await client.get("/v1/me/vouchers", headers=merchant)).status_code == 403
        for params in ({"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"cursor": "!!"}):
            r = await client.get("/v1/me/vouchers", params=params, headers=api.auth("user", "u-1"))
            assert r.status_code == 422, (params, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        other = await client.get("/v1/me/vouchers", headers=api.auth("user", "nobody"))
        assert other.json() == {"vouchers": [], "next_cursor": None}
