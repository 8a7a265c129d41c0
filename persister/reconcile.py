"""``flashsale reconcile``: every difference between Redis and PostgreSQL, per deal and voucher.

Waits for the persister to catch up first; what is still in the streams unacknowledged
after the wait is lag, not a difference, and is reported as such. Archived deals
(``deals.archived_at``) have left Redis on purpose: their absence there is no difference.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from database.pool import Database
from engine.claims import parse_holder
from engine.deals import DealHash
from engine.store import Store
from engine.streams import stream_lag
from persister import queries, scan
from persister.consumer import unacknowledged

CHUNK = 500


@dataclass(frozen=True, slots=True)
class Difference:
    """One thing Redis and PostgreSQL disagree on."""

    kind: str
    deal_id: str
    voucher_id: str = ""
    detail: str = ""

    def __str__(self) -> str:
        parts = [self.kind, f"deal={self.deal_id}"]
        if self.voucher_id:
            parts.append(f"voucher={self.voucher_id}")
        if self.detail:
            parts.append(self.detail)
        return " ".join(parts)


@dataclass(slots=True)
class Report:
    differences: list[Difference] = field(default_factory=list)
    lag: int = 0
    in_flight: int = 0
    deals: int = 0
    vouchers: int = 0


@dataclass(slots=True)
class _InFlight:
    deals: set[str] = field(default_factory=set)
    vouchers: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.deals) + len(self.vouchers)


async def wait_for_lag(store: Store, wait_s: float) -> int:
    """Poll the persister's lag until it is 0 or ``wait_s`` passed; return the last lag."""
    deadline = time.monotonic() + wait_s
    while True:
        lag = await stream_lag(store)
        if lag == 0 or time.monotonic() >= deadline:
            return lag
        await asyncio.sleep(0.2)


async def _in_flight(store: Store) -> _InFlight:
    """Ids named by entries not yet acknowledged (pending, or never delivered)."""
    out = _InFlight()
    for key in store.keys.all_events():
        for _id, f in await unacknowledged(store, key):
            if f.get("type") in ("deal", "cancel"):
                out.deals.add(f.get("deal", ""))
            elif f.get("voucher"):
                out.vouchers.add(f["voucher"])
    return out


async def _redis_deal_ids(store: Store) -> list[str]:
    return sorted(await scan.deal_ids(store))


def _claimers(raw: dict[str, str]) -> dict[str, tuple[str, int, int]]:
    """voucher id -> (user, seq, claimed_at_ms), from the claimers hash."""
    out = {}
    for user, value in raw.items():
        vid, seq, at = parse_holder(value)
        out[vid] = (user, seq, at)
    return out


async def reconcile(store: Store, db: Database, wait_s: float) -> Report:
    """Compare Redis and PostgreSQL after waiting up to ``wait_s`` for the persister."""
    report = Report(lag=await wait_for_lag(store, wait_s))
    flying = await _in_flight(store) if report.lag else _InFlight()
    report.in_flight = len(flying)
    redis_ids = await _redis_deal_ids(store)
    report.deals = len(redis_ids)
    for i in range(0, len(redis_ids), CHUNK):
        await _compare_chunk(store, db, redis_ids[i : i + CHUNK], flying, report)
    # Deals PostgreSQL has and Redis does not.
    known = set(redis_ids)
    after = ""
    async with db.connection() as conn:
        while True:
            rows = await conn.fetch(queries.SELECT_DEALS, after, CHUNK)
            for r in rows:
                if r["id"] not in known and not r["archived"]:
                    report.differences.append(Difference("deal_missing_in_redis", r["id"]))
            if len(rows) < CHUNK:
                break
            after = rows[-1]["id"]
    return report


async def _compare_chunk(
    store: Store, db: Database, deal_ids: list[str], flying: _InFlight, report: Report
) -> None:
    pipe = store.pipeline()
    for d in deal_ids:
        k = store.keys.for_deal(d)
        pipe.hgetall(k.deal)
        pipe.hgetall(k.claimers)
    replies = await pipe.execute()
    async with db.connection() as conn:
        pg_deals = {r["id"]: r for r in await conn.fetch(queries.SELECT_DEALS_BY_ID, deal_ids)}
        pg_vouchers: dict[str, dict[str, Any]] = {d: {} for d in deal_ids}
        for r in await conn.fetch(queries.SELECT_VOUCHERS_OF_DEALS, deal_ids):
            pg_vouchers[r["deal_id"]][r["id"]] = r
    add = report.differences.append
    for n, deal_id in enumerate(deal_ids):
        h: dict[str, str] = replies[2 * n]
        claimers = _claimers(replies[2 * n + 1])
        report.vouchers += len(claimers)
        if not h:
            continue  # deleted between SCAN and now
        pg = pg_deals.get(deal_id)
        if pg is None:
            if deal_id not in flying.deals:
                add(Difference("deal_missing_in_postgres", deal_id))
        elif pg["merchant_id"] is None:
            if deal_id not in flying.deals:
                add(Difference("deal_incomplete_in_postgres", deal_id, detail="only cancelled"))
        else:
            for name, redis_value, pg_value in (
                ("merchant", h.get(DealHash.MERCHANT), pg["merchant_id"]),
                ("total", int(h.get(DealHash.TOTAL, -1)), pg["inventory_total"]),
            ):
                if redis_value != pg_value:
                    add(
                        Difference(
                            "deal_field_differs",
                            deal_id,
                            detail=f"{name}: redis={redis_value!r} postgres={pg_value!r}",
                        )
                    )
            cancelled = h.get(DealHash.CANCELLED)
            if bool(cancelled) != (pg["cancelled"] is not None) and deal_id not in flying.deals:
                add(
                    Difference(
                        "deal_cancel_differs",
                        deal_id,
                        detail=f"redis cancelled={cancelled} postgres={pg['cancelled']}",
                    )
                )
        issued = int(h.get(DealHash.TOTAL, 0)) - int(h.get(DealHash.LEFT, 0))
        if issued != len(claimers):
            add(
                Difference(
                    "inventory_differs",
                    deal_id,
                    detail=f"redis issued={issued} claimers={len(claimers)}",
                )
            )
        in_pg = pg_vouchers.get(deal_id, {})
        for vid, (user, seq, at) in claimers.items():
            row = in_pg.get(vid)
            if row is None:
                if vid not in flying.vouchers:
                    add(
                        Difference(
                            "voucher_missing_in_postgres", deal_id, vid, f"seq={seq} user={user}"
                        )
                    )
            elif (row["user_id"], row["seq"], row["claimed"]) != (user, seq, at):
                add(
                    Difference(
                        "voucher_differs",
                        deal_id,
                        vid,
                        f"redis=({user}, {seq}, {at}) postgres=({row['user_id']}, "
                        f"{row['seq']}, {row['claimed']})",
                    )
                )
        for vid, row in in_pg.items():
            if vid not in claimers:
                add(
                    Difference(
                        "voucher_missing_in_redis",
                        deal_id,
                        vid,
                        f"seq={row['seq']} user={row['user_id']}",
                    )
                )
        seqs = {row["seq"] for row in in_pg.values()} | {s for _, s, _ in claimers.values()}
        top = max([int(h.get(DealHash.SEQ, 0)), *seqs], default=0)
        gaps = sorted(set(range(1, top + 1)) - seqs)
        if gaps:
            add(Difference("seq_gap", deal_id, detail=f"missing seq {gaps[:20]}"))
