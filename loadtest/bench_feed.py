"""Cost of reading the redemptions feed (engine/feed.py), page by page, on embedded Valkey.

    .venv/bin/python -m loadtest.bench_feed [--n 5000]

One merchant's ``n`` redemptions, in one deal (one partition) or spread over 16 deals;
the whole feed is read with each limit. Prints a table; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from engine import claims, feed, redemptions
from engine.deals import NewDeal, create_deal
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from engine.vouchers import VoucherSigner
from flashsale.embedded import EmbeddedRedis


def _deal(merchant: str, inventory: int) -> NewDeal:
    starts = now_ms() - 60_000
    return NewDeal(
        merchant_id=merchant,
        title="bench",
        description="",
        lat=12.97,
        lng=77.59,
        inventory=inventory,
        starts_at_ms=starts,
        ends_at_ms=starts + 3_600_000,
        redeem_until_ms=starts + 7 * MS_PER_DAY,
    )


async def _run(url: str, data_dir: Path, n: int) -> None:
    settings = Settings(redis_url=url, data_dir=data_dir)
    store = await Store.connect(settings)
    signer = VoucherSigner(settings.signing_keys_dir)
    print(
        "| vouchers in | limit | pages | max XRANGE calls | max round trips |"
        " max entries read | ms/page |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    try:
        for deals, merchant in ((1, "m-one"), (16, "m-spread")):
            made = [await create_deal(store, _deal(merchant, n)) for _ in range(deals)]
            issued = await asyncio.gather(
                *(claims.claim(store, made[i % deals].id, f"u-{merchant}-{i}") for i in range(n))
            )
            await asyncio.gather(
                *(
                    redemptions.redeem(store, signer, signer.sign(r.voucher), merchant)
                    for r in issued
                )
            )
            for limit in (100, 1000):
                cursor = feed.Cursor.start(store.keys.partitions)
                pages = calls = trips = read = 0
                start = time.perf_counter()
                while True:
                    page = await feed.read_page(store, merchant, cursor, limit)
                    pages += 1
                    calls = max(calls, page.xrange_calls)
                    trips = max(trips, page.round_trips)
                    read = max(read, page.entries_read)
                    cursor = page.next
                    if len(page.items) < limit:
                        break
                ms = (time.perf_counter() - start) / pages * 1000
                where = "1 deal (one partition)" if deals == 1 else f"{deals} deals"
                print(f"| {where} | {limit} | {pages} | {calls} | {trips} | {read} | {ms:.1f} |")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000, help="redemptions per merchant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            asyncio.run(_run(redis.url, Path(tmp), args.n))
        finally:
            redis.stop()


if __name__ == "__main__":
    main()
