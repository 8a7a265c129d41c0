"""Persister throughput (rows/s into PostgreSQL) and end-to-end lag under a claim load.

Starts its own Redis (valkey) and a durable PostgreSQL (fsync on), fills the partition
streams with claim events shaped as ``lua/claim_voucher.lua`` writes them (random voucher
ids, as ``engine.claims.new_voucher_id`` makes them), then times, each run into a fresh
migrated database with the consumer group rewound to the start of the streams:

1. the bare ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` alone, on the
   same rows in batches as large as one persister round (the ceiling for one connection);
   (after an untimed warm-up pass, so that every run recycles WAL segments rather
   than the first one creating them);
2. the persister in this process, sequential (read, write, commit, XACK, read, ...) and
   pipelined (the next XREADGROUP overlaps the current commit); the bench watches the
   persister's own counters, so measuring costs it nothing;
3. 1 and N real ``flashsale persist`` processes, timed from the first acknowledged batch
   to an empty backlog (stream lag polled from this process every 20 ms);
4. lag: a producer process XADDs claims continuously at ``--lag-rate`` per second for
   ``--lag-seconds`` while one ``flashsale persist`` keeps up; every 50 ms the age of the
   oldest entry not yet acknowledged (= not yet committed: the persister acks only after
   the commit) is sampled: that is how far PostgreSQL is behind Redis, in time.

    .venv/bin/python -m loadtest.bench_persister [--rows 200000] [--batch 2000]
        [--processes 2] [--lag-rate 5000] [--lag-seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from database.pool import Database
from engine.keys import STREAM_GROUP
from engine.settings import Settings
from engine.store import Store
from engine.streams import parse_id, stream_lag
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis
from persister import queries
from persister.events import Entry, parse
from persister.schema import migrate
from persister.worker import Persister

PARTITIONS = 16
DEALS = 64
ROOT = Path(__file__).resolve().parents[1]


def _deal_ids() -> list[str]:
    return [f"d_{secrets.token_hex(8)}" for _ in range(DEALS)]


def _claim(deal: str, seq: int, at: int) -> dict[str, str | int]:
    return {
        "type": "claim",
        "deal": deal,
        "seq": seq,
        "voucher": f"v{secrets.token_hex(8)}.{deal}",
        "user": f"u-{secrets.token_hex(6)}",
        "at": at,
    }


async def _add_deals(store: Store, deal_ids: list[str], total: int) -> None:
    now = int(time.time() * 1000)
    pipe = store.client.pipeline(transaction=False)
    for d in deal_ids:
        pipe.xadd(
            store.keys.for_deal(d).events,
            {
                "type": "deal",
                "deal": d,
                "merchant": "m-1",
                "title": "bench",
                "desc": "",
                "lat": "12.97",
                "lng": "77.59",
                "total": total,
                "starts": now,
                "ends": now + 3_600_000,
                "redeem": now + 7_200_000,
                "at": now,
            },
        )
    await pipe.execute()


async def _fill(store: Store, rows: int) -> None:
    """XADD ``rows`` claim events (and their deals) as the Lua scripts would."""
    deal_ids = _deal_ids()
    await _add_deals(store, deal_ids, rows)
    now = int(time.time() * 1000)
    seqs = dict.fromkeys(deal_ids, 0)
    for start in range(0, rows, 10_000):
        pipe = store.client.pipeline(transaction=False)
        for i in range(start, min(rows, start + 10_000)):
            d = deal_ids[i % DEALS]
            seqs[d] += 1
            pipe.xadd(store.keys.for_deal(d).events, _claim(d, seqs[d], now + i // 100))
        await pipe.execute()


async def _rewind(store: Store, to: str = "0") -> None:
    """Point the group back at the start (``0``) or the end (``$``) of every stream."""
    for key in store.keys.all_events():
        if await store.client.exists(key):
            await store.client.xgroup_destroy(key, STREAM_GROUP)
        # entries_read: so that XINFO GROUPS knows the lag exactly (else stream_lag counts
        # it with an XRANGE of the whole backlog on every poll, slowing Redis for everyone).
        await store.client.xgroup_create(
            key, STREAM_GROUP, id=to, mkstream=True, entries_read=0 if to == "0" else None
        )


async def _fresh_db(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = server_url.rsplit("/", 1)[0] + "/" + name
    await migrate(dsn)
    return dsn


async def _count(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM vouchers"))
    finally:
        await conn.close()


async def _insert_alone(store: Store, dsn: str, batch: int) -> float:
    """The bare unnest insert on the same rows (read from the streams beforehand)."""
    claims = []
    for key in store.keys.all_events():
        for entry_id, fields in await store.client.xrange(key):
            if fields.get("type") == "claim":
                claims.append(Entry(key, entry_id, fields))
    chunks = [parse(claims[i : i + batch])[0] for i in range(0, len(claims), batch)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CHECKPOINT")
        started = time.perf_counter()
        for rows in chunks:
            deal, seq, voucher, user, at, _s, _e = (
                list(c) for c in zip(*rows.vouchers, strict=True)
            )
            async with conn.transaction():
                await conn.fetchval(queries.INSERT_VOUCHERS, voucher, deal, seq, user, at)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return len(claims) / elapsed


async def _in_process(settings: Settings, rows: int, *, pipeline: bool) -> float:
    store = await Store.connect(settings)
    db = Database(settings.database_url or "")
    await db.open()
    async with db.connection() as conn:
        await conn.execute("CHECKPOINT")
    p = Persister(settings, store, db, "bench-0", pipeline=pipeline)
    started = time.perf_counter()
    task = asyncio.create_task(p.run())
    while p.stats.vouchers_new < rows:  # noqa: ASYNC110 - the persister's own counter
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    p.stop()
    await task
    await db.close()
    await store.close()
    return rows / elapsed


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSALE_")}
    env.update(
        FLASHSALE_REDIS_URL=settings.redis_url or "",
        FLASHSALE_DATABASE_URL=settings.database_url or "",
        FLASHSALE_PARTITIONS=str(settings.partitions),
        FLASHSALE_PERSISTER_BATCH=str(settings.persister_batch),
        FLASHSALE_STREAM_RETENTION="3600",
        FLASHSALE_DATA_DIR=str(settings.data_dir),
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def _spawn_persisters(settings: Settings, n: int, log_dir: Path) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-m", "flashsale", "persist"],
            env=_env(settings, FLASHSALE_PERSISTER_NAME=f"bench-p{i}"),
            stdout=open(log_dir / f"persister-{i}.log", "ab"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        for i in range(n)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(15)


async def _processes(store: Store, settings: Settings, n: int, log_dir: Path) -> float:
    """``n`` real persister processes: rows/s from the first ack to an empty backlog."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    total = await stream_lag(store)
    procs = _spawn_persisters(settings, n, log_dir)
    try:
        while (lag0 := await stream_lag(store)) == total:  # noqa: ASYNC110 - another process
            await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        while await stream_lag(store):  # noqa: ASYNC110 - polling other processes
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
    finally:
        _stop(procs)
    return lag0 / elapsed


async def _oldest_unacked_age_ms(store: Store) -> int:
    """Age (by Redis's clock) of the oldest entry the group has not acknowledged; 0 if none."""
    c = store.client
    sec, usec = await c.time()
    now = int(sec) * 1000 + int(usec) // 1000
    oldest: int | None = None
    for key in store.keys.all_events():
        group = next(g for g in await c.xinfo_groups(key) if g["name"] == STREAM_GROUP)
        candidates = []
        if int(group["pending"]):
            first = (await c.xpending(key, STREAM_GROUP))["min"]
            if first:  # None: acknowledged meanwhile
                candidates.append(parse_id(str(first))[0])
        undelivered = await c.xrange(key, min=f"({group['last-delivered-id']}", count=1)
        if undelivered:
            candidates.append(parse_id(str(undelivered[0][0]))[0])
        if candidates:
            oldest = min(candidates + ([oldest] if oldest is not None else []))
    return 0 if oldest is None else max(0, now - oldest)


async def _lag(store: Store, settings: Settings, rate: int, seconds: float, log_dir: Path):  # type: ignore[no-untyped-def]
    """One persister keeping up with ``rate`` claims/s: samples of how far behind it is."""
    await _rewind(store, "$")
    procs = _spawn_persisters(settings, 1, log_dir)
    producer = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [
            sys.executable,
            "-m",
            "loadtest.bench_persister",
            "--produce",
            str(rate),
            "--seconds",
            str(seconds),
            "--redis",
            settings.redis_url or "",
        ],
        env=_env(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    samples: list[int] = []
    try:
        await asyncio.sleep(1.0)  # the producer and the persister start
        while producer.poll() is None:
            samples.append(await _oldest_unacked_age_ms(store))
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 30
        while await stream_lag(store) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        left = await stream_lag(store)
    finally:
        _stop(procs)
    out = producer.stdout.read().decode() if producer.stdout else ""
    produced, achieved = (float(x) for x in out.split())
    return samples, int(produced), achieved, left


async def _produce(redis_url: str, rate: int, seconds: float) -> None:
    """XADD claims at ``rate``/s (10 ms ticks, one pipeline each) with Redis's clock as ``at``."""
    settings = Settings(redis_url=redis_url, partitions=PARTITIONS)
    store = await Store.connect(settings)
    deal_ids = _deal_ids()
    await _add_deals(store, deal_ids, 10**9)
    seqs = dict.fromkeys(deal_ids, 0)
    tick, sent, i = 0.01, 0, 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        due = int(rate * elapsed) - sent
        if due > 0:
            sec, usec = await store.client.time()
            at = int(sec) * 1000 + int(usec) // 1000
            pipe = store.client.pipeline(transaction=False)
            for _ in range(due):
                d = deal_ids[i % DEALS]
                i += 1
                seqs[d] += 1
                pipe.xadd(store.keys.for_deal(d).events, _claim(d, seqs[d], at))
            await pipe.execute()
            sent += due
        await asyncio.sleep(tick)
    print(sent, sent / (time.perf_counter() - started))
    await store.close()


def _pct(values: list[int], p: float) -> int:
    if not values:
        return 0
    return sorted(values)[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


async def bench(rows: int, batch: int, processes: int, lag_rate: int, lag_s: float) -> None:
    results: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-persister-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis").start()
        pg = EmbeddedPostgres(Path(tmp) / "pg").start()  # durable: fsync on
        try:
            base = Settings(
                redis_url=redis.url,
                partitions=PARTITIONS,
                persister_batch=batch,
                stream_retention_s=3600,
                data_dir=Path(tmp),
            )
            store = await Store.connect(base)
            await _fill(store, rows)
            # Warm-up, not timed: a fresh cluster creates (zero-fills, fsyncs) its WAL
            # segments the first time; later runs recycle them. Without this, whichever
            # run comes first is slower for reasons that are not its own.
            await _insert_alone(store, await _fresh_db(pg.url, "warm_up"), batch * PARTITIONS)
            dsn = await _fresh_db(pg.url, "insert_alone")
            alone = await _insert_alone(store, dsn, batch * PARTITIONS)
            assert await _count(dsn) == rows
            results.append(
                (
                    f"unnest insert alone, one connection (batches of {batch * PARTITIONS})",
                    f"{alone:,.0f}",
                )
            )
            for pipeline in (False, True):
                dsn = await _fresh_db(pg.url, f"inproc_{int(pipeline)}")
                await _rewind(store)
                got = await _in_process(base.with_(database_url=dsn), rows, pipeline=pipeline)
                assert await _count(dsn) == rows
                how = "pipelined" if pipeline else "sequential"
                results.append((f"persister in-process, {how}", f"{got:,.0f}"))
            for n in sorted({1, processes}):
                dsn = await _fresh_db(pg.url, f"procs_{n}")
                await _rewind(store)
                got = await _processes(store, base.with_(database_url=dsn), n, Path(tmp))
                assert await _count(dsn) == rows
                results.append((f"`flashsale persist` x {n} process(es)", f"{got:,.0f}"))
            if lag_s > 0:
                dsn = await _fresh_db(pg.url, "lag")
                samples, produced, achieved, left = await _lag(
                    store, base.with_(database_url=dsn), lag_rate, lag_s, Path(tmp)
                )
                assert left == 0 and await _count(dsn) == produced, (left, produced)
            await store.close()
        finally:
            redis.stop()
            pg.remove_data()
    print(
        f"\n{rows} claim rows, {PARTITIONS} partitions, read batch {batch}/stream, "
        f"durable PostgreSQL (fsync on), load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| path | rows/s |")
    print("| --- | ---: |")
    for name, value in results:
        print(f"| {name} | {value} |")
    if lag_s > 0:
        print(
            f"\nlag: one `flashsale persist` under {achieved:,.0f} claims/s for {lag_s:.0f}s "
            f"({produced} claims, all in PostgreSQL afterwards); age of the oldest "
            f"unacknowledged entry, {len(samples)} samples every 50 ms:\n"
        )
        print("| p50 | p90 | p99 | max |")
        print("| ---: | ---: | ---: | ---: |")
        print(" | ".join(["", *(f"{_pct(samples, p)} ms" for p in (50, 90, 99, 100)), ""]).strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=2000, help="entries read per stream per round")
    p.add_argument("--processes", type=int, default=2, help="compare 1 with this many")
    p.add_argument("--lag-rate", type=int, default=5000, help="claims/s during the lag run")
    p.add_argument("--lag-seconds", type=float, default=20.0, help="0: no lag run")
    p.add_argument("--produce", type=int, help=argparse.SUPPRESS)  # the lag run's producer
    p.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    p.add_argument("--redis", help=argparse.SUPPRESS)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.produce:
        asyncio.run(_produce(args.redis, args.produce, args.seconds))
        return
    asyncio.run(bench(args.rows, args.batch, args.processes, args.lag_rate, args.lag_seconds))


if __name__ == "__main__":
    main()
