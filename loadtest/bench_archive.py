"""The archiver beside the claim storm: the storm's rate while finished deals are archived,
next to its rate without, and the archive rate.

    python -m loadtest.bench_archive [--deals 10000] [--seconds 12] [--concurrency 256]

1. N deals, each claimed by two users, one voucher of each redeemed, all written to
   PostgreSQL by the persister (in this process).
2. The claim storm (``engine.claims.claim`` on a sold-out deal from one process, C tasks,
   auto-pipelined: the storm's answer is 409 sold_out) runs throughout.
3. After S/4 seconds, ``archive_due`` in another process archives the N deals (at a "now"
   past their archive time), paced as the persister paces it (``archive_work_fraction``),
   and is stopped and resumed every 2 s (SIGSTOP, SIGCONT) until it is done: the storm's
   rate while it runs is compared with its rate while it is stopped, interleaved so that
   the shared machine's drift falls on both alike. The archive rate is deals/s of running
   time.

Starts an embedded Redis and PostgreSQL unless ``FLASHSALE_REDIS_URL`` and
``FLASHSALE_DATABASE_URL`` are set. Prints a table; asserts nothing (a benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from database.pool import Database
from engine import claims, redemptions
from engine.deals import NewDeal, create_deal
from engine.errors import SoldOut, Unavailable
from engine.settings import Settings
from engine.store import Store
from engine.streams import stream_lag
from engine.times import MS_PER_DAY, now_ms
from engine.vouchers import VoucherSigner
from flashsale.embedded import EmbeddedPostgres, EmbeddedRedis
from persister.schema import migrate
from persister.worker import Persister

ROOT = Path(__file__).resolve().parents[1]
LATER_MS = 400 * MS_PER_DAY  # a "now" past every deal's archive time here


def _settings(data_dir: Path) -> Settings:
    fraction = os.environ.get("BENCH_ARCHIVE_WORK_FRACTION")
    return Settings(
        redis_url=os.environ["FLASHSALE_REDIS_URL"],
        database_url=os.environ["FLASHSALE_DATABASE_URL"],
        data_dir=data_dir,
        stream_cap=100_000_000,
        **({"archive_work_fraction": float(fraction)} if fraction else {}),  # type: ignore[arg-type]
    )


def _deal(inventory: int) -> NewDeal:
    now = now_ms()
    return NewDeal(
        "m-bench",
        "bench",
        "",
        1.0,
        1.0,
        inventory,
        now - 1000,
        now + 3_600_000,
        now + 2 * MS_PER_DAY,
    )


async def _setup(settings: Settings, deals: int) -> None:
    store = await Store.connect(settings)
    db = Database(settings.database_url or "")
    await db.open()
    signer = VoucherSigner(settings.signing_keys_dir)
    try:
        await store.client.flushall()
        sem = asyncio.Semaphore(256)

        async def one(n: int) -> None:
            async with sem:
                deal = await create_deal(store, _deal(5))
                a = (await claims.claim(store, deal.id, f"a-{n}")).voucher
                await claims.claim(store, deal.id, f"b-{n}")
                await redemptions.redeem(store, signer, signer.sign(a), "m-bench")

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(deals)))
        print(
            f"setup: {deals} deals, {2 * deals} vouchers, {deals} redemptions in "
            f"{time.perf_counter() - started:.1f}s",
            flush=True,
        )
        persister = Persister(settings, store, db, "bench-0")
        task = asyncio.create_task(persister.run())
        lag = await stream_lag(store)
        while lag:
            await asyncio.sleep(0.2)
            lag = await stream_lag(store)
        persister.stop()
        await task
        print(f"persisted in {time.perf_counter() - started:.1f}s", flush=True)
    finally:
        await db.close()
        await store.close()


async def _storm(settings: Settings, seconds: float, concurrency: int) -> None:
    """Claims on a sold-out deal for ``seconds``; prints (time, count) every 0.1 s."""
    store = await Store.connect(settings)
    try:
        deal = await create_deal(store, _deal(1))
        await claims.claim(store, deal.id, "first")
        count = 0
        stop = time.monotonic() + seconds

        async def worker(w: int) -> None:
            nonlocal count
            i = 0
            while time.monotonic() < stop:
                with contextlib.suppress(SoldOut):
                    await claims.claim(store, deal.id, f"s-{w}-{i}")
                count += 1
                i += 1

        async def report() -> None:
            while time.monotonic() < stop:
                print(json.dumps({"t": time.time(), "n": count}), flush=True)
                await asyncio.sleep(0.1)

        await asyncio.gather(report(), *(worker(w) for w in range(concurrency)))
        print(json.dumps({"t": time.time(), "n": count}), flush=True)
    finally:
        await store.close()


async def _archive(settings: Settings, idle_s: float = 0.0) -> None:
    """Archive every deal now; or, with ``idle_s`` (the control run), only wait that long."""
    from persister.archive import archive_due

    store = await Store.connect(settings)
    db = Database(settings.database_url or "")
    await db.open()
    try:
        later = await store.server_time_ms() + LATER_MS
        start = time.time()
        if idle_s:
            await asyncio.sleep(idle_s)
            print(json.dumps({"start": start, "end": time.time(), "archived": 0, "waiting": 0}))
            return
        while True:
            try:
                run = await archive_due(
                    store, db, now_ms=later, work_fraction=settings.archive_work_fraction
                )
            except Unavailable:
                # Resumed after a SIGSTOP, a call in flight outlived its timeout: the pass
                # is safe to run again (what it archived is gone from the index).
                continue
            break
        end = time.time()
        async with db.connection() as conn:
            archived = await conn.fetchval(
                "SELECT count(*) FROM deals WHERE archived_at IS NOT NULL"
            )
        print(
            json.dumps(
                {
                    "start": start,
                    "end": end,
                    "archived": archived,
                    "waiting": len(run.waiting),
                }
            ),
            flush=True,
        )
    finally:
        await db.close()
        await store.close()


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loadtest.bench_archive", *args],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _samples(out: str) -> list[tuple[float, int]]:
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"t"')]
    return [(r["t"], r["n"]) for r in rows]


def _count_at(samples: list[tuple[float, int]], t: float) -> float:
    """Claims counted by time ``t`` (linear between the two samples around it)."""
    for (t0, n0), (t1, n1) in itertools.pairwise(samples):
        if t0 <= t <= t1:
            return n0 + (n1 - n0) * (t - t0) / (t1 - t0) if t1 > t0 else n0
    return samples[-1][1] if t > samples[-1][0] else samples[0][1]


def bench(
    deals: int, seconds: float, concurrency: int, control: float = 0.0, period_s: float = 2.0
) -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="fs-bench-archive-"))
    asyncio.run(migrate(os.environ["FLASHSALE_DATABASE_URL"]))
    settings = _settings(data_dir)
    asyncio.run(_setup(settings, deals))

    # One storm throughout; the archiver is stopped (SIGSTOP) and resumed (SIGCONT) every
    # period: the storm's rate with it running and without are interleaved in time, so
    # that the shared machine's drift falls on both alike.
    storm = _spawn("--storm", "--seconds", "3600", "--concurrency", str(concurrency))
    time.sleep(seconds / 4)  # the storm at full speed first
    archiver = _spawn("--archive", "--control", str(control))
    windows: list[tuple[float, float, bool]] = []
    running, since = True, time.time()
    while archiver.poll() is None:
        time.sleep(period_s)
        now = time.time()
        if archiver.poll() is not None:
            break
        windows.append((since, now, running))
        archiver.send_signal(signal.SIGSTOP if running else signal.SIGCONT)
        running, since = not running, now
    windows.append((since, time.time(), running))
    archive_out, _ = archiver.communicate()
    # A last window without, as long as one period, if the archive ended running.
    if running:
        time.sleep(period_s)
        windows.append((windows[-1][1], time.time(), False))
    storm.kill()
    out, _ = storm.communicate()
    samples = _samples(out)
    done = json.loads(archive_out.strip().splitlines()[-1])

    def rate(on: bool) -> tuple[float, float]:
        picked = [(a, b) for a, b, r in windows if r is on]
        n = sum(_count_at(samples, b) - _count_at(samples, a) for a, b in picked)
        span = sum(b - a for a, b in picked)
        return (n / span if span else 0.0), span

    with_rate, with_s = rate(True)
    without_rate, without_s = rate(False)
    print()
    print("| measure | value |")
    print("| --- | ---: |")
    print(
        f"| claim storm, archiver stopped (claims/s over {without_s:.0f} s) | {without_rate:,.0f} |"
    )
    print(f"| claim storm, archiver running (claims/s over {with_s:.0f} s) | {with_rate:,.0f} |")
    print(f"| ratio (target at least 0.9) | {with_rate / without_rate:.2f} |")
    print(f"| deals archived | {done['archived']:,} of {deals:,} ({done['waiting']} waiting) |")
    print(
        f"| archive rate (deals/s while running, beside the storm) | "
        f"{done['archived'] / with_s:,.0f} |"
    )
    if control:
        print(f"| (control run: the archiver only waited {control:.0f} s) | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deals", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=12.0, help="the storm's lead (S/4)")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--storm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--archive", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--work-fraction",
        type=float,
        help="the archiver's share of wall time (default: the setting's, as the persister)",
    )
    p.add_argument(
        "--control",
        type=float,
        default=0.0,
        help="a control run: the archiver only waits this many seconds (the method's noise)",
    )
    args = p.parse_args()
    if args.work_fraction is not None:  # read by every process of the run
        os.environ["BENCH_ARCHIVE_WORK_FRACTION"] = str(args.work_fraction)
    if args.storm or args.archive:
        settings = _settings(Path(tempfile.mkdtemp(prefix="fs-bench-archive-")))
        coro = (
            _storm(settings, args.seconds, args.concurrency)
            if args.storm
            else _archive(settings, args.control)
        )
        asyncio.run(coro)
        return
    servers: list[EmbeddedRedis | EmbeddedPostgres] = []
    base = Path(tempfile.mkdtemp(prefix="fs-bench-servers-"))
    try:
        if not os.environ.get("FLASHSALE_REDIS_URL"):
            redis_server = EmbeddedRedis(base / "redis").start()
            servers.append(redis_server)
            os.environ["FLASHSALE_REDIS_URL"] = redis_server.url
        if not os.environ.get("FLASHSALE_DATABASE_URL"):
            pg = EmbeddedPostgres(base / "pg", fast=True).start()
            servers.append(pg)
            os.environ["FLASHSALE_DATABASE_URL"] = pg.url
        bench(args.deals, args.seconds, args.concurrency, args.control)
    finally:
        for server in servers:
            if isinstance(server, EmbeddedPostgres):
                server.remove_data()
            else:
                server.stop()


if __name__ == "__main__":
    main()
