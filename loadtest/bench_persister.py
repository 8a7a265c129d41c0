"""Persister throughput: rows/s into PostgreSQL, the persister vs the bare insert.

Starts its own Redis (valkey) and a durable PostgreSQL (fsync on), fills the partition
streams with claim events, then times

1. the persister draining them (read, parse, one transaction per round, XACK, trim), and
2. the same ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` alone, on the
   same rows in batches of the same size, into a second fresh database.

    .venv/bin/python -m loadtest.bench_persister [--rows 200000] [--batch 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from pathlib import Path

import asyncpg

from engine.settings import Settings
from engine.store import Store
from engine.streams import stream_lag
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis
from persister import queries
from persister.db import Database, migrate
from persister.events import Entry, parse
from persister.worker import Persister

PARTITIONS = 16
DEALS = 64


async def _fill(store: Store, rows: int) -> None:
    """XADD ``rows`` claim events (and their deals) as the Lua scripts would."""
    now = int(time.time() * 1000)
    pipe = store.client.pipeline(transaction=False)
    deal_ids = [f"d_bench{i:04d}" for i in range(DEALS)]
    for d in deal_ids:
        k = store.keys.for_deal(d)
        pipe.xadd(k.events, {"type": "deal", "deal": d, "merchant": "m-1", "title": "bench",
                             "desc": "", "lat": "12.97", "lng": "77.59", "total": rows,
                             "starts": now, "ends": now + 3_600_000, "redeem": now + 7_200_000,
                             "at": now})  # fmt: skip
    await pipe.execute()
    seqs = dict.fromkeys(deal_ids, 0)
    for start in range(0, rows, 10_000):
        pipe = store.client.pipeline(transaction=False)
        for i in range(start, min(rows, start + 10_000)):
            d = deal_ids[i % DEALS]
            seqs[d] += 1
            pipe.xadd(store.keys.for_deal(d).events, {"type": "claim", "deal": d,
                      "seq": seqs[d], "voucher": f"v{i:08x}.{d}", "user": f"u-{i}",
                      "at": now + i // 100})  # fmt: skip
        await pipe.execute()


async def _persister_rows_s(settings: Settings, rows: int) -> float:
    store = await Store.connect(settings)
    db = Database(settings.database_url or "")
    await db.open()
    p = Persister(settings, store, db, "bench-0")
    started = time.perf_counter()
    task = asyncio.create_task(p.run())
    while await stream_lag(store):  # noqa: ASYNC110 - polling another system
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    p.stop()
    await task
    assert p.stats.vouchers_new == rows, p.stats
    await db.close()
    await store.close()
    return rows / elapsed


async def _insert_alone_rows_s(store: Store, dsn: str, batch: int) -> tuple[float, int]:
    """The bare unnest insert on the same rows (read from the streams beforehand)."""
    claims = []
    for key in store.keys.all_events():
        for entry_id, fields in await store.client.xrange(key):
            if fields.get("type") == "claim":
                claims.append(Entry(key, entry_id, fields))
    chunks = [parse(claims[i : i + batch])[0] for i in range(0, len(claims), batch)]
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for rows in chunks:
            deal, seq, voucher, user, at, _s, _e = (list(c) for c in zip(*rows.claims, strict=True))
            async with conn.transaction():
                await conn.fetchval(queries.INSERT_VOUCHERS, voucher, deal, seq, user, at)
        elapsed = time.perf_counter() - started
        count = await conn.fetchval("SELECT count(*) FROM vouchers")
    finally:
        await conn.close()
    return len(claims) / elapsed, int(count)


async def _create_db(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = server_url.rsplit("/", 1)[0] + "/" + name
    await migrate(dsn)
    return dsn


async def bench(rows: int, batch: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-persister-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis").start()
        pg = EmbeddedPostgres(Path(tmp) / "pg").start()  # durable: fsync on
        try:
            dsn_a = await _create_db(pg.url, "bench_persister")
            dsn_b = await _create_db(pg.url, "bench_insert")
            settings = Settings(redis_url=redis.url, database_url=dsn_a, partitions=PARTITIONS,
                                persister_batch=batch, stream_retention_s=3600)  # fmt: skip
            store = await Store.connect(settings)
            await _fill(store, rows)
            alone, count = await _insert_alone_rows_s(store, dsn_b, batch * PARTITIONS)
            assert count == rows
            persisted = await _persister_rows_s(settings, rows)
            await store.close()
        finally:
            redis.stop()
            pg.stop()
    print(f"\n{rows} claim rows, {PARTITIONS} partitions, read batch {batch}/stream, "
          "durable PostgreSQL (fsync on), one process each\n")  # fmt: skip
    print("| path | rows/s |")
    print("| --- | ---: |")
    print(f"| unnest insert alone (batches of up to {batch * PARTITIONS}) | {alone:,.0f} |")
    print(f"| persister (XREADGROUP, parse, insert, XACK, trim) | {persisted:,.0f} |")
    print(f"| ratio persister / insert alone | {persisted / alone:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=2000, help="entries read per stream per round")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(bench(args.rows, args.batch))


if __name__ == "__main__":
    main()
