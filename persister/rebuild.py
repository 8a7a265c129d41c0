"""``flashsale rebuild-redis``: restore deals, inventory and claims from PostgreSQL.

After Redis lost its data: each deal hash (``left`` = total - issued, ``seq`` at least
the highest issued), its claimers and vouchers hashes (so earlier winners get their
same voucher back), its first redemptions, the geo index of deals still claimable, and
the archive index with each deal's key deadline (at least ``max(grace, 7 days)`` away, so
that a deal overdue for archiving is archived, not expired). Archived deals are left
alone: PostgreSQL answers for them.
Claims that were acknowledged by Redis but not yet persisted are gone with Redis
(unless ``FLASHSALE_DURABILITY=aof``, where Redis keeps them itself).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from database.pool import Database
from engine.claims import holder_value
from engine.deals import ARCHIVE_BACKSTOP_MIN_MS, DealHash, archive_times
from engine.errors import StartupError
from engine.redemptions import redemption_value
from engine.store import Store
from persister import queries, scan

log = logging.getLogger(__name__)

CHUNK = 500


class RedisNotEmpty(StartupError):
    """Redis already holds deals: rebuilding over them needs ``--force`` (exit 2)."""


@dataclass(slots=True)
class Rebuilt:
    deals: int = 0
    vouchers: int = 0
    redemptions: int = 0
    indexed: int = 0
    archived: int = 0  # left alone
    skipped: list[str] = field(default_factory=list)


async def count_deals(store: Store, limit: int = 1) -> int:
    """How many deal hashes Redis holds (stops counting at ``limit``)."""
    return len(await scan.deal_ids(store, limit))


async def rebuild_redis(store: Store, db: Database, *, force: bool = False) -> Rebuilt:
    """Write PostgreSQL's deals, vouchers and redemptions into Redis."""
    if not force and await count_deals(store):
        raise RedisNotEmpty("Redis already holds deals; use --force to rebuild over them")
    out = Rebuilt()
    now_ms = await store.server_time_ms() // 1000 * 1000
    after = ""
    while True:
        async with db.connection() as conn:
            deals = await conn.fetch(queries.SELECT_DEALS, after, CHUNK)
            ids = [d["id"] for d in deals if not d["archived"]]
            vouchers = await conn.fetch(queries.SELECT_VOUCHERS_OF_DEALS, ids)
            redemptions = await conn.fetch(queries.SELECT_REDEMPTIONS_OF_DEALS, ids)
        await _write_chunk(store, deals, vouchers, redemptions, now_ms, force, out)
        if len(deals) < CHUNK:
            return out
        after = deals[-1]["id"]


async def _write_chunk(
    store: Store,
    deals: list[Any],
    vouchers: list[Any],
    redemptions: list[Any],
    now_ms: int,
    force: bool,
    out: Rebuilt,
) -> None:
    by_deal: dict[str, list[Any]] = {}
    for v in vouchers:
        by_deal.setdefault(v["deal_id"], []).append(v)
    redeemed: dict[str, list[Any]] = {}
    for r in redemptions:
        redeemed.setdefault(r["deal_id"], []).append(r)
    complete = []
    for d in deals:
        if d["archived"]:
            out.archived += 1
        elif d["merchant_id"] is None:
            # Only its cancellation reached PostgreSQL: nothing to rebuild it from.
            out.skipped.append(d["id"])
            log.error("deal %s has no creation record in PostgreSQL: not restored", d["id"])
        else:
            complete.append(d)
    existing_seq: list[Any] = [None] * len(complete)
    if force:
        pipe = store.pipeline()
        for d in complete:
            pipe.hget(store.keys.for_deal(d["id"]).deal, DealHash.SEQ)
        existing_seq = await pipe.execute()
    pipe = store.pipeline()
    for d in complete:
        k = store.keys.for_deal(d["id"])
        held = by_deal.get(d["id"], [])
        if held:
            pipe.hset(
                k.claimers,
                mapping={v["user_id"]: holder_value(v["id"], v["seq"], v["claimed"]) for v in held},
            )
            pipe.hset(k.vouchers, mapping={v["id"]: v["user_id"] for v in held})
        firsts = redeemed.get(d["id"], [])
        if firsts:
            pipe.hset(
                k.redemptions,
                mapping={
                    r["voucher_id"]: redemption_value(
                        r["redeemed"], r["device_id"], r["entry_id"], r["merchant_id"]
                    )
                    for r in firsts
                },
            )
        pipe.hlen(k.claimers)
    issued_counts = (await pipe.execute())[-len(complete) :] if complete else []
    grace_ms = int(store.settings.archive_grace_s * 1000)
    floor_ms = now_ms + max(grace_ms, ARCHIVE_BACKSTOP_MIN_MS)
    pipe = store.pipeline()
    for d, issued, seq_before in zip(complete, issued_counts, existing_seq, strict=True):
        k = store.keys.for_deal(d["id"])
        held = by_deal.get(d["id"], [])
        total = int(d["inventory_total"])
        left = total - int(issued)
        seq = max([int(seq_before or 0), *(int(v["seq"]) for v in held)], default=0)
        fields = {
            DealHash.MERCHANT: d["merchant_id"],
            DealHash.TITLE: d["title"],
            DealHash.DESC: d["description"] or "",
            DealHash.LAT: repr(float(d["lat"])),
            DealHash.LNG: repr(float(d["lng"])),
            DealHash.TOTAL: total,
            DealHash.LEFT: left,
            DealHash.SEQ: seq,
            DealHash.STARTS: d["starts"],
            DealHash.ENDS: d["ends"],
            DealHash.REDEEM: d["redeem"],
            DealHash.CREATED: d["created"],
        }
        if d["cancelled"] is not None:
            fields[DealHash.CANCELLED] = d["cancelled"]
        pipe.hset(k.deal, mapping=fields)
        due, deadline = archive_times(int(d["redeem"]), grace_ms)
        for key in (k.deal, k.claimers, k.vouchers, k.redemptions):
            pipe.expire_at_ms(key, max(deadline, floor_ms))  # a key not written: no-op
        pipe.zadd(k.archive, d["id"], due)
        claimable = d["cancelled"] is None and d["ends"] > now_ms and left > 0
        if claimable:
            pipe.geoadd(k.geo, float(d["lng"]), float(d["lat"]), d["id"])
            out.indexed += 1
        else:
            pipe.zrem(k.geo, d["id"])
        out.deals += 1
        out.vouchers += len(held)
        out.redemptions += len(redeemed.get(d["id"], []))
    await pipe.execute()
