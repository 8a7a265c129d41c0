"""Claims under attack: the claim storm alone, then while hostile discovery runs, one run.

    python -m loadtest.bench_attack [--deals 20000] [--seconds 5] [--attackers 2]

Engine level, on one embedded Redis (or ``--url``):

1. ``--deals`` active deals over a 50 x 50 km city; one deal with stock for every claim.
2. **quiet**: ``--claimers`` concurrent tasks in this process claim it (a new user each
   time, ``engine.claims.claim``) for ``--seconds``: claims/s and latency percentiles.
3. **CPU control**: the same, while ``--attackers`` processes only burn CPU (no Redis):
   what sharing this machine's cores with them costs the claims by itself.
4. **under attack**: the same, while ``--attackers`` processes (each its own ``Discovery``,
   as an API process has) run ``--tasks`` clients each, every client alternating an ocean
   query and a query in a city cell nobody asked before, radius 50 km, limit 100.

The other processes run at nice 10, so that they take what the claims leave of the
CPUs; still, on a machine with fewer free cores than busy processes, the CPU control
shows how much of a drop is this benchmark's processes sharing cores rather than
discovery's work in Redis. Redis time is read from ``INFO commandstats`` (all scripts,
and the GEOSEARCH and ZCOUNT inside them) for each phase.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from engine import claims
from engine.deals import NewDeal, create_deal
from engine.discovery import Discovery
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from flashsale.embedded import EmbeddedRedis
from loadtest.bench_discovery import city_point, fill

OCEAN = (-30.0, -140.0)  # the South Pacific: nothing within 50 km


def pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] * 1000 if values else float("nan")
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] * 1000


async def redis_usec(store: Store) -> dict[str, int]:
    stats = await store.client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["usec"]) for k, v in stats.items()}


async def storm(store: Store, deal_id: str, seconds: float, claimers: int, tag: str) -> Any:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def one(w: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await claims.claim(store, deal_id, f"{tag}-{w}-{i}")
            latencies.append(time.perf_counter() - t0)
            i += 1

    before = await redis_usec(store)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(w) for w in range(claimers)))
    elapsed = time.perf_counter() - t0
    after = await redis_usec(store)
    used = {k: (after.get(k, 0) - before.get(k, 0)) / 1e6 / elapsed for k in after}
    return len(latencies) / elapsed, latencies, used


def burner(url: str, until: float, seed: int, tasks: int, counts: Any) -> None:
    """The CPU control: as busy as it is let be, without Redis."""
    os.nice(10)
    started = time.time()
    while time.time() < until:
        sum(i * i for i in range(1000))
    counts[seed] = (0, time.time() - started)


def attacker(url: str, until: float, seed: int, tasks: int, counts: Any) -> None:
    os.nice(10)

    async def run() -> None:
        store = await Store.connect(Settings(redis_url=url))
        d = Discovery(store)
        done = 0
        started = time.time()

        async def client(k: int) -> None:
            nonlocal done
            rnd = random.Random(seed * 100 + k)
            while time.time() < until:
                await d.nearby(
                    OCEAN[0] + rnd.uniform(-5, 5), OCEAN[1] + rnd.uniform(-5, 5), 50.0, 100
                )
                lat, lng = city_point(rnd)  # a fresh cell: nobody asked it before
                await d.nearby(lat, lng, 50.0, 100)
                done += 2

        await asyncio.gather(*(client(k) for k in range(tasks)))
        counts[seed] = (done, time.time() - started)
        await d.close()
        await store.close()

    asyncio.run(run())


async def setup(url: str, deals: int) -> str:
    store = await Store.connect(Settings(redis_url=url, stream_cap=100_000_000))
    try:
        await store.client.flushall()
        await fill(store, deals, random.Random(deals))
        start = now_ms() - 60_000
        target = NewDeal(
            "m-storm",
            "storm",
            "",
            1.0,
            1.0,
            10_000_000,
            start,
            start + MS_PER_DAY,
            start + 2 * MS_PER_DAY,
        )
        return (await create_deal(store, target)).id
    finally:
        await store.close()


async def phase(url: str, deal_id: str, args: argparse.Namespace, tag: str) -> Any:
    store = await Store.connect(Settings(redis_url=url, stream_cap=100_000_000))
    try:
        return await storm(store, deal_id, args.seconds, args.claimers, tag)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="Redis URL (default: start an embedded one)")
    p.add_argument("--deals", type=int, default=20_000)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--claimers", type=int, default=64)
    p.add_argument("--attackers", type=int, default=2, help="attack processes")
    p.add_argument("--tasks", type=int, default=2, help="clients per attack process")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else EmbeddedRedis(Path(tmp)).start()
        url = args.url or server.url  # type: ignore[union-attr]
        try:
            run(url, args)
        finally:
            if server is not None:
                server.stop()


def run(url: str, args: argparse.Namespace) -> None:
    deal_id = asyncio.run(setup(url, args.deals))
    quiet = asyncio.run(phase(url, deal_id, args, "q"))
    control, _ = beside(url, deal_id, args, burner, "c")
    attacked, attack_rate = beside(url, deal_id, args, attacker, "a")
    report(args, quiet, control, attacked, attack_rate)


def beside(url: str, deal_id: str, args: argparse.Namespace, target: Any, tag: str) -> Any:
    """The claim storm while ``--attackers`` processes run ``target``."""
    ctx = multiprocessing.get_context("spawn")
    counts = ctx.Manager().dict()
    warmup = 2.0
    until = time.time() + warmup + args.seconds + 0.5
    procs = [
        ctx.Process(target=target, args=(url, until, k + 1, args.tasks, counts))
        for k in range(args.attackers)
    ]
    for proc in procs:
        proc.start()
    time.sleep(warmup)
    result = asyncio.run(phase(url, deal_id, args, tag))
    for proc in procs:
        proc.join(timeout=60)
    return result, sum(done / elapsed for done, elapsed in counts.values())


def report(
    args: argparse.Namespace, quiet: Any, control: Any, attacked: Any, attack_rate: float
) -> None:
    print(
        f"\nclaim storm, {args.claimers} concurrent claimers (engine.claims.claim, a new user "
        f"each), {args.seconds:g} s per phase, {args.deals:,} active deals; attack: "
        f"{args.attackers} processes x {args.tasks} clients, ocean + fresh city cell, "
        f"radius 50 km, limit 100; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| phase | claims/s | p50 ms | p99 ms | max ms | Redis busy in scripts "
        "| of which GEOSEARCH | ZCOUNT |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    phases = (("quiet", quiet), ("CPU control", control), ("under attack", attacked))
    for name, (rate, lat, used) in phases:
        scripts = used.get("evalsha", 0) + used.get("eval", 0)
        print(
            f"| {name} | {rate:,.0f} | {pct(lat, 50):.2f} | {pct(lat, 99):.2f} "
            f"| {max(lat) * 1000:.1f} | {scripts:.0%} | {used.get('geosearch', 0):.0%} "
            f"| {used.get('zcount', 0):.0%} |"
        )
    (qr, ql, _), (cr, cl, _), (ar, al, _) = quiet, control, attacked
    print(
        f"\nunder attack / quiet: rate {ar / qr:.2f} (target >= 0.8), "
        f"p99 {pct(al, 99) / pct(ql, 99):.2f}x (target <= 2x); "
        f"under attack / CPU control: rate {ar / cr:.2f}, p99 {pct(al, 99) / pct(cl, 99):.2f}x; "
        f"attack: {attack_rate:,.0f} discovery requests/s"
    )


if __name__ == "__main__":
    main()
