"""How much Redis memory one live deal, one live voucher and one redemption take.

    python -m loadtest.bench_memory [--deals 2000] [--vouchers 100] [--voucher-deals 200]

Two measures, on a fresh Redis (embedded unless ``FLASHSALE_REDIS_URL`` is set; it is
flushed): ``INFO memory`` ``used_memory`` before and after, divided by the count (every
cost: keys, fields, index entries, the expiry of each key), and ``MEMORY USAGE ... SAMPLES
0`` of sample keys (the keys themselves). The partition streams are emptied before each
reading: their entries leave Redis once persisted (``FLASHSALE_STREAM_RETENTION``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from engine import claims, redemptions
from engine.deals import NewDeal, create_deal
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from engine.vouchers import VoucherSigner
from flashsale.embedded import EmbeddedRedis


def _deal(inventory: int) -> NewDeal:
    now = now_ms()
    return NewDeal(
        "m-memory",
        "2-for-1 espresso",
        "",
        12.9716,
        77.5946,
        inventory,
        now - 1000,
        now + 3_600_000,
        now + 7 * MS_PER_DAY,
    )


async def _used(store: Store) -> int:
    for key in store.keys.all_events():
        await store.client.delete(key)
    info = await store.client.info("memory")
    return int(info["used_memory"])


async def _usage(store: Store, key: str) -> int:
    return int(await store.client.memory_usage(key, samples=0) or 0)


async def measure(url: str, deals: int, vouchers: int, voucher_deals: int) -> None:
    settings = Settings(
        redis_url=url, stream_cap=100_000_000, data_dir=Path(tempfile.mkdtemp(prefix="fs-memory-"))
    )
    store = await Store.connect(settings)
    signer = VoucherSigner(settings.signing_keys_dir)
    try:
        await store.client.flushall()
        base = await _used(store)
        made = await asyncio.gather(*(create_deal(store, _deal(vouchers)) for _ in range(deals)))
        per_deal = (await _used(store) - base) / deals
        sample = store.keys.for_deal(made[0].id)
        deal_key = await _usage(store, sample.deal)

        base = await _used(store)
        held = await asyncio.gather(
            *(
                claims.claim(store, d.id, f"u-{i}")
                for d in made[:voucher_deals]
                for i in range(vouchers)
            )
        )
        n = voucher_deals * vouchers
        per_voucher = (await _used(store) - base) / n
        holders = await _usage(store, sample.claimers) + await _usage(store, sample.vouchers)

        base = await _used(store)
        for i in range(0, n, 1000):  # a slice per round trip, inside the read timeout
            await asyncio.gather(
                *(
                    redemptions.redeem(store, signer, signer.sign(r.voucher), "m-memory")
                    for r in held[i : i + 1000]
                )
            )
        per_redemption = (await _used(store) - base) / n
        redeemed = await _usage(store, sample.redemptions)
        await store.client.flushall()
    finally:
        await store.close()
    print("| what | used_memory delta / count (B) | MEMORY USAGE of a sample (B) |")
    print("| --- | ---: | ---: |")
    print(
        f"| one live deal (hash, geo and archive index entries), {deals:,} deals "
        f"| {per_deal:,.0f} | deal hash {deal_key:,} |"
    )
    print(
        f"| one live voucher (claimers + vouchers fields), {n:,} vouchers over "
        f"{voucher_deals} deals | {per_voucher:,.0f} | "
        f"{holders / vouchers:,.0f} ({vouchers}-voucher deal's two hashes / {vouchers}) |"
    )
    print(
        f"| one first redemption (redemptions field) | {per_redemption:,.0f} | "
        f"{redeemed / vouchers:,.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--deals", type=int, default=2000)
    p.add_argument("--vouchers", type=int, default=100, help="vouchers per claimed deal")
    p.add_argument("--voucher-deals", type=int, default=200, help="deals that get claimed")
    args = p.parse_args()
    url = os.environ.get("FLASHSALE_REDIS_URL")
    server = None
    if not url:
        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="fs-memory-redis-"))).start()
        url = server.url
    try:
        asyncio.run(measure(url, args.deals, args.vouchers, args.voucher_deals))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
