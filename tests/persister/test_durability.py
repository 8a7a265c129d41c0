"""Real faults end to end: PostgreSQL stopped under claims, a small stream cap, Redis killed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx

from api.auth import mint
from engine import claims
from engine.deals import create_deal
from engine.errors import StoreUnavailable
from engine.settings import Settings
from engine.store import Store
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.api.conftest import serve_in_thread, stop_thread
from tests.conftest import flush
from tests.helpers import new_deal
from tests.persister.conftest import (
    SECRET,
    PersisterProcess,
    fresh_database,
    running_persister,
    wait_caught_up,
)


@contextlib.asynccontextmanager
async def _api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    server, thread, url = serve_in_thread(settings)
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client
    finally:
        stop_thread(server, thread)


async def _claim(client: httpx.AsyncClient, deal_id: str, user: str) -> tuple[int, str | None]:
    token = mint(SECRET, user, "user")
    r = await client.post(
        f"/v1/deals/{deal_id}/claims", headers={"Authorization": f"Bearer {token}"}
    )
    vid = r.json()["voucher"]["id"] if r.status_code in (200, 201) else None
    return r.status_code, vid


async def _pg_vouchers(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        return {r["id"] for r in await conn.fetch("SELECT id FROM vouchers")}
    finally:
        await conn.close()


async def test_postgres_stopped_while_claims_go_on_then_every_voucher_lands(
    own_postgres: EmbeddedPostgres,
    redis_url: str,
    tmp_path: Path,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """PostgreSQL really stopped for seconds: claims answer 201/409 only; back: all land."""
    flush(redis_url, False)
    dsn = await fresh_database(own_postgres.url)
    settings = Settings(
        redis_url=redis_url, database_url=dsn, partitions=4, data_dir=tmp_path, auth_secret=SECRET
    )
    store = await Store.connect(settings)
    persister = spawn_persister(settings, FLASHSALE_PERSISTER_NAME="p-pg")
    try:
        deal = await create_deal(store, new_deal(100))
        async with _api(settings) as client:
            before = await asyncio.gather(*(_claim(client, deal.id, f"u-{i}") for i in range(20)))
            await wait_caught_up(store)
            own_postgres.stop()
            during: list[tuple[int, str | None]] = []
            for wave in range(6):  # three seconds of claims with PostgreSQL gone
                users = [f"w{wave}-{i}" for i in range(20)]
                during += await asyncio.gather(*(_claim(client, deal.id, u) for u in users))
                await asyncio.sleep(0.5)
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["postgres"] == "down"
        statuses = [s for s, _ in before + during]
        assert set(statuses) <= {201, 409}, statuses
        assert statuses.count(201) == 100
        assert await _lag(store) > 0  # the stream holds what PostgreSQL could not take
        own_postgres.start()
        await wait_caught_up(store, 40)
        assert await _pg_vouchers(dsn) == {v for s, v in before + during if s == 201}
        assert persister.proc.poll() is None
        assert "PostgreSQL unavailable" in persister.output()
    finally:
        await store.close()


async def _lag(store: Store) -> int:
    from engine.streams import stream_lag

    return await stream_lag(store)


async def test_small_stream_cap_refuses_claims_with_503_and_loses_nothing(
    own_postgres: EmbeddedPostgres,
    redis_url: str,
    tmp_path: Path,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """PostgreSQL down, cap 20: claims past the cap get 503; back up, every 201 lands."""
    flush(redis_url, False)
    dsn = await fresh_database(own_postgres.url)
    settings = Settings(
        redis_url=redis_url,
        database_url=dsn,
        partitions=1,
        stream_cap=20,
        data_dir=tmp_path,
        auth_secret=SECRET,
    )
    store = await Store.connect(settings)
    try:
        deal = await create_deal(store, new_deal(200))  # one entry in the stream
        own_postgres.stop()
        persister = spawn_persister(settings, FLASHSALE_PERSISTER_NAME="p-cap")
        async with _api(settings) as client:
            results = [await _claim(client, deal.id, f"u-{i}") for i in range(40)]
            statuses = [s for s, _ in results]
            assert statuses[:19] == [201] * 19
            assert set(statuses[19:]) == {503}
            own_postgres.start()
            await wait_caught_up(store, 40)
            assert await _pg_vouchers(dsn) == {v for s, v in results if s == 201}
            # Persisted and near the cap: trimmed although young, so claims flow again.
            await asyncio.sleep(1.5)
            assert (await _claim(client, deal.id, "after"))[0] == 201
        assert persister.terminate() == 0
    finally:
        await store.close()


async def test_redis_killed_mid_run_in_aof_mode_loses_no_acknowledged_claim(
    own_redis: EmbeddedRedis, db_url: str, tmp_path: Path
) -> None:
    """SIGKILL Redis under a claim storm (aof mode): every acknowledged claim survives it."""
    settings = Settings(
        redis_url=own_redis.url,
        database_url=db_url,
        partitions=4,
        durability="aof",
        data_dir=tmp_path,
    )
    store = await Store.connect(settings)
    acked: dict[str, str] = {}
    try:
        deals = [await create_deal(store, new_deal(5000)) for _ in range(4)]

        async def storm(worker: int) -> None:
            for i in range(100_000):
                try:
                    c = (await claims.claim(store, deals[i % 4].id, f"u-{worker}-{i}")).voucher
                except StoreUnavailable:
                    return
                acked[c.voucher_id] = c.user_id

        tasks = [asyncio.create_task(storm(w)) for w in range(20)]
        await asyncio.sleep(1.0)
        own_redis.stop(kill=True)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert len(acked) > 100
        own_redis.start()  # same port, same data dir: the AOF is replayed
        for _ in range(200):  # accepting connections, maybe still loading the AOF
            if (await store.client.info("persistence")).get("loading") == 0:
                break
            await asyncio.sleep(0.05)
        survived: dict[str, str] = {}
        for d in deals:
            k = store.keys.for_deal(d.id)
            survived.update(await store.client.hgetall(k.vouchers))
        lost = set(acked) - set(survived)
        assert not lost, f"{len(lost)} acknowledged claims lost"
        async with running_persister(settings):
            await wait_caught_up(store, 30)
        assert set(acked) <= await _pg_vouchers(db_url)
    finally:
        await store.close()


async def _stall_settings(pg: EmbeddedPostgres, redis_url: str, tmp_path: Path) -> Settings:
    """A flushed Redis, a fresh database, and a persister that reclaims after 1 s idle and
    dead-letters an entry delivered twice: the setting in which holding a batch through an
    outage must not cost it its deliveries."""
    flush(redis_url, False)
    return Settings(
        redis_url=redis_url,
        database_url=await fresh_database(pg.url),
        partitions=2,
        data_dir=tmp_path,
        auth_secret=SECRET,
        persister_batch=10,
        persister_block_ms=50,
        persister_claim_idle_s=1.0,
        persister_max_deliveries=1,
        persister_backoff_max_s=0.3,
    )


async def test_a_long_postgres_outage_never_dead_letters_what_the_persister_holds(
    own_postgres: EmbeddedPostgres, redis_url: str, tmp_path: Path
) -> None:
    """PostgreSQL stopped longer than claim_idle (and a reclaim period) while the persister
    holds a batch and one read ahead, max deliveries 1: its own reclaim must not take them
    back (raising their delivery counts); back up, everything lands, nothing dead."""
    settings = await _stall_settings(own_postgres, redis_url, tmp_path)
    dsn = settings.database_url or ""
    store = await Store.connect(settings)
    try:
        deal = await create_deal(store, new_deal(200))
        async with running_persister(settings, "p-stall") as p:
            await wait_caught_up(store)
            own_postgres.stop()
            issued = {}
            for i in range(60):
                c = (await claims.claim(store, deal.id, f"u-{i}")).voucher
                issued[c.voucher_id] = c.user_id
            await asyncio.sleep(6.5)  # > claim_idle and > the reclaim period
            assert p._ahead is not None  # a batch in hand, and one read ahead
            own_postgres.start()
            await wait_caught_up(store, 30)
            assert p.stats.dead == 0
        assert await _pg_vouchers(dsn) == set(issued)
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
        finally:
            await conn.close()
    finally:
        await store.close()


async def test_two_persisters_holding_batches_through_an_outage_leave_each_other_alone(
    own_postgres: EmbeddedPostgres, redis_url: str, tmp_path: Path
) -> None:
    """Two persisters each hold a batch while PostgreSQL is down longer than claim_idle:
    each keeps its batch fresh, so neither reclaims the other's (which would raise the
    delivery counts past max 1 and dead-letter valid entries); back up, all land."""
    settings = await _stall_settings(own_postgres, redis_url, tmp_path)
    dsn = settings.database_url or ""
    store = await Store.connect(settings)
    try:
        deal = await create_deal(store, new_deal(200))
        async with running_persister(settings, "p-a") as a, running_persister(settings, "p-b") as b:
            await wait_caught_up(store)
            own_postgres.stop()
            issued = {}
            for i in range(80):
                c = (await claims.claim(store, deal.id, f"u-{i}")).voucher
                issued[c.voucher_id] = c.user_id
            await asyncio.sleep(7.0)  # > claim_idle and > the reclaim period
            own_postgres.start()
            await wait_caught_up(store, 30)
            assert a.stats.dead == b.stats.dead == 0
        assert await _pg_vouchers(dsn) == set(issued)
    finally:
        await store.close()
