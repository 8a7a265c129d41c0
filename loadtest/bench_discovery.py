"""Discovery benchmark: ``engine.discovery`` next to the seed's approach, in one run.

Fills Redis with 1k, 10k and 100k active deals spread uniformly over a 50 x 50 km city,
then, for 2 km and 5 km radii (limit 20), measures requests/s and latency percentiles
of callers at random points in the city:

- ``geo``: ``Discovery.nearby`` (geo index + cell cache + live state), one caller
  awaiting each answer before the next, and 32 concurrent callers in one process;
- ``seed``: the seed's way: load every active deal's coordinates and state, filter by
  Haversine in Python, sort, then read the nearest deals (its cache was keyed by the
  exact coordinates, so random callers never hit it), one caller.

It also measures Redis memory per active deal. Starts its own embedded Redis unless
``--url`` is given; every measurement and the whole run are time-bounded.

    python -m loadtest.bench_discovery [--url redis://...] [--cluster] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engine.deals import ACTIVE, NewDeal, create_deal, deal_status
from engine.discovery import Discovery, haversine_km
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from flashsale.embedded import EmbeddedRedis

CITY_LAT, CITY_LNG = 12.9716, 77.5946  # the city's centre
CITY_KM = 50.0
LIMIT = 20
CONCURRENCY = 32


def city_point(rnd: random.Random) -> tuple[float, float]:
    """A uniformly random point of the 50 x 50 km square around the centre."""
    km_per_deg_lat = haversine_km(CITY_LAT, CITY_LNG, CITY_LAT + 1, CITY_LNG)
    km_per_deg_lng = haversine_km(CITY_LAT, CITY_LNG, CITY_LAT, CITY_LNG + 1)
    half = CITY_KM / 2
    return (
        CITY_LAT + rnd.uniform(-half, half) / km_per_deg_lat,
        CITY_LNG + rnd.uniform(-half, half) / km_per_deg_lng,
    )


async def fill(store: Store, n: int, rnd: random.Random) -> list[str]:
    """Create ``n`` active deals at random points of the city."""
    start = now_ms() - 60_000
    ids: list[str] = []
    batch = 2_000
    for i in range(0, n, batch):
        specs = []
        for _ in range(min(batch, n - i)):
            lat, lng = city_point(rnd)
            specs.append(
                NewDeal(
                    "m-bench",
                    "bench deal",
                    "",
                    lat,
                    lng,
                    1_000,
                    start,
                    start + MS_PER_DAY,
                    start + 2 * MS_PER_DAY,
                )
            )
        deals = await asyncio.gather(*(create_deal(store, s) for s in specs))
        ids.extend(d.id for d in deals)
    return ids


class Seed:
    """The seed's discovery: every active deal from the store, Haversine in Python."""

    def __init__(self, store: Store, ids: list[str]) -> None:
        self.store = store
        self.ids = ids  # the seed asked its database for them: give it the list for free

    async def nearby(self, lat: float, lng: float, radius_km: float, limit: int) -> list[Any]:
        pipe = self.store.client.pipeline(transaction=False)
        for deal_id in self.ids:
            pipe.hmget(
                self.store.keys.for_deal(deal_id).deal,
                "lat",
                "lng",
                "left",
                "starts",
                "ends",
                "cancelled",
            )
        rows = await pipe.execute()
        now = now_ms()
        hits = []
        for deal_id, (dlat, dlng, left, starts, ends, cancelled) in zip(
            self.ids, rows, strict=True
        ):
            status = deal_status(now, int(starts), int(ends), int(left), bool(cancelled))
            if status != ACTIVE:
                continue
            d = haversine_km(lat, lng, float(dlat), float(dlng))
            if d <= radius_km:
                hits.append((d, deal_id))
        hits.sort()
        pipe = self.store.client.pipeline(transaction=False)
        for _, deal_id in hits[:limit]:
            pipe.hgetall(self.store.keys.for_deal(deal_id).deal)
        return list(zip(hits[:limit], await pipe.execute(), strict=True))


async def measure(
    call: Callable[[float, float], Awaitable[Any]],
    seconds: float,
    callers: int,
    seed: int,
    max_requests: int = 1_000_000,
) -> tuple[float, list[float]]:
    """Requests/s and per-request latencies (s) of ``callers`` looping for ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller(k: int) -> None:
        rnd = random.Random(seed * 1000 + k)
        while time.perf_counter() < deadline and len(latencies) < max_requests:
            lat, lng = city_point(rnd)
            t0 = time.perf_counter()
            await call(lat, lng)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(callers)))
    return len(latencies) / (time.perf_counter() - t0), latencies


def pct(latencies: list[float], q: float) -> float:
    if len(latencies) < 2:
        return latencies[0] * 1000 if latencies else float("nan")
    return statistics.quantiles(latencies, n=1000)[int(q * 10) - 1] * 1000


async def memory_per_deal(store: Store, ids: list[str], before: int) -> dict[str, float]:
    """Bytes of Redis memory per deal: in all, and by structure (one node only)."""
    c = store.client
    info = await c.info("memory")
    sample = ids[:: max(1, len(ids) // 200)]
    hash_bytes = statistics.mean(
        [await c.memory_usage(store.keys.for_deal(i).deal, samples=0) for i in sample]
    )
    geo = sum([await c.memory_usage(k, samples=0) or 0 for k in store.keys.all_geo()])
    events = sum([await c.memory_usage(k, samples=0) or 0 for k in store.keys.all_events()])
    return {
        "total": (int(info["used_memory"]) - before) / len(ids),
        "hash": hash_bytes,
        "geo": geo / len(ids),
        "stream": events / len(ids),
    }


async def run(args: argparse.Namespace, url: str) -> None:
    settings = Settings(redis_url=url, redis_cluster=args.cluster)
    store = await Store.connect(settings)
    run_deadline = time.monotonic() + args.max_seconds
    rows: list[tuple[Any, ...]] = []
    memory: list[tuple[int, dict[str, float]]] = []
    try:
        for n in args.sizes:
            if time.monotonic() > run_deadline:
                print(f"# time budget spent: skipping {n} deals", file=sys.stderr)
                continue
            if args.cluster:
                await store.client.flushall(target_nodes=store.client.PRIMARIES)
            else:
                await store.client.flushall()
                before = int((await store.client.info("memory"))["used_memory"])
            t0 = time.perf_counter()
            ids = await fill(store, n, random.Random(n))
            print(f"# {n} deals created in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            if not args.cluster:
                memory.append((n, await memory_per_deal(store, ids, before)))
            seed = Seed(store, ids)
            for radius in args.radii:
                geo = Discovery(store)
                r1, l1 = await measure(
                    lambda a, b, g=geo, r=radius: g.nearby(a, b, r, LIMIT), args.seconds, 1, 1
                )
                hit = geo.hits / max(1, geo.hits + geo.misses)
                rc, lc = await measure(
                    lambda a, b, g=geo, r=radius: g.nearby(a, b, r, LIMIT),
                    args.seconds,
                    CONCURRENCY,
                    2,
                )
                await geo.close()
                rs, ls = await measure(
                    lambda a, b, s=seed, r=radius: s.nearby(a, b, r, LIMIT),
                    args.seconds,
                    1,
                    3,
                    max_requests=10_000,
                )
                rows.append(
                    (
                        n,
                        radius,
                        r1,
                        pct(l1, 50),
                        pct(l1, 99),
                        hit,
                        rc,
                        pct(lc, 99),
                        rs,
                        pct(ls, 99),
                        r1 / rs,
                    )
                )
                print(f"# {n} deals, {radius} km done", file=sys.stderr)
    finally:
        await store.close()
    print_table(rows, memory, args)


def print_table(
    rows: list[tuple[Any, ...]],
    memory: list[tuple[int, dict[str, float]]],
    args: argparse.Namespace,
) -> None:
    print(
        f"discovery, limit {LIMIT}, random callers over a {CITY_KM:.0f} x {CITY_KM:.0f} km "
        f"city, {args.seconds:g}s per cell, {'cluster' if args.cluster else 'one node'}"
    )
    print()
    print(
        "| deals | radius | geo 1 caller req/s | p50 ms | p99 ms | cache hits "
        f"| geo {CONCURRENCY} callers req/s | p99 ms | seed req/s | seed p99 ms | geo/seed |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, radius, r1, p50, p99, hit, rc, pc, rs, ps, ratio in rows:
        print(
            f"| {n:,} | {radius:g} km | {r1:,.0f} | {p50:.2f} | {p99:.2f} | {hit:.0%} "
            f"| {rc:,.0f} | {pc:.1f} | {rs:,.1f} | {ps:,.0f} | {ratio:,.0f}x |"
        )
    if memory:
        print()
        print("| deals | Redis bytes per deal (all) | deal hash | geo index entry | stream entry |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for n, m in memory:
            print(
                f"| {n:,} | {m['total']:,.0f} | {m['hash']:,.0f} | {m['geo']:,.0f} "
                f"| {m['stream']:,.0f} |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Redis URL (default: start an embedded one)")
    parser.add_argument("--cluster", action="store_true", help="--url is a Redis Cluster")
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--radii", default="2,5")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="the whole run")
    args = parser.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.radii = [float(x) for x in args.radii.split(",")]
    if args.url:
        asyncio.run(run(args, args.url))
        return
    if args.cluster:
        parser.error("--cluster needs --url")
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp)).start()
        try:
            asyncio.run(run(args, server.url))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
