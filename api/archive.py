"""Archived deals, answered from PostgreSQL (docs/lifecycle.md).

Once a deal is archived (``deals.archived_at``) and its keys have left Redis, every route
answers for it from here, as Redis would have: ``GET /v1/deals/{id}`` with its last status,
a claim (the holder's own voucher, else ``cancelled`` or ``ended``), a voucher and its QR
code, and redemptions, decided by the rules of ``lua/redeem_voucher.lua`` on the
``redemptions`` and ``redemption_conflicts`` tables. Only deals Redis no longer has come
here, and only archived ones are answered: a deal that merely went missing from Redis
(lost data, before ``rebuild-redis``) stays unknown rather than be judged on a stale view.

Cost, for a caller who sends unknown ids: each such request makes one primary-key probe
here, through the API's small pool (at most 10 connections, 2 s to get one), after the
Redis read it made anyway; the claim race's Redis sees nothing more. An archived deal never
changes, so its answer is kept (a bounded LRU of :data:`DEAL_CACHE_SIZE`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from api.records import Records
from engine.claims import ClaimResult, Voucher
from engine.deals import CANCELLED, ENDED, Deal
from engine.errors import DealCancelled, DealEnded, DealNotFound, StoreUnavailable
from engine.times import now_ms
from engine.vouchers import HeldVoucher, VoucherToken

DEAL_CACHE_SIZE = 4096

_DEAL = """
SELECT d.id, d.merchant_id, d.title, d.description, d.lat, d.lng, d.inventory_total,
       fs_to_ms(d.starts_at) AS starts, fs_to_ms(d.ends_at) AS ends,
       fs_to_ms(d.redeem_until) AS redeem, fs_to_ms(d.cancelled_at) AS cancelled,
       (SELECT count(*) FROM vouchers v WHERE v.deal_id = d.id) AS issued
FROM deals d
WHERE d.id = $1 AND d.archived_at IS NOT NULL AND d.merchant_id IS NOT NULL
"""

_ARCHIVED_COUNT = "SELECT count(*) FROM deals WHERE archived_at IS NOT NULL"

_HOLDER = """
SELECT v.id, v.seq, fs_to_ms(v.claimed_at) AS claimed
FROM vouchers v
WHERE v.user_id = $1 AND v.deal_id = $2
"""

_VOUCHER = """
SELECT v.id, v.deal_id, v.user_id, v.seq, fs_to_ms(v.claimed_at) AS claimed,
       d.merchant_id, fs_to_ms(d.redeem_until) AS redeem,
       fs_to_ms(r.redeemed_at) AS redeemed, r.merchant_id AS first_merchant,
       r.entry_id AS first_entry
FROM vouchers v
JOIN deals d ON d.id = v.deal_id AND d.archived_at IS NOT NULL AND d.merchant_id IS NOT NULL
LEFT JOIN redemptions r ON r.voucher_id = v.id
WHERE v.id = $1
"""

_FIRST = """
SELECT fs_to_ms(redeemed_at) AS at, merchant_id, entry_id
FROM redemptions WHERE voucher_id = $1
"""

# As the persister writes a redeem event: the first accepted redemption wins.
_INSERT_FIRST = """
INSERT INTO redemptions (voucher_id, deal_id, merchant_id, redeemed_at, device_id, entry_id)
VALUES ($1, $2, $3, fs_ms($4), $5, $6)
ON CONFLICT (voucher_id) DO NOTHING
RETURNING voucher_id
"""

# As the persister writes a redeem_conflict event (keyed as the script keys it).
_INSERT_CONFLICT = """
INSERT INTO redemption_conflicts (voucher_id, deal_id, merchant_id, redeemed_at,
                                  first_redeemed_at, device_id, entry_id)
VALUES ($1, $2, $3, fs_ms($4), fs_ms($5), $6, $7)
ON CONFLICT (voucher_id, merchant_id, entry_id) DO NOTHING
"""


class Archive:
    """The API's view of archived deals, in PostgreSQL through :class:`Records`."""

    def __init__(self, records: Records, cache_size: int = DEAL_CACHE_SIZE) -> None:
        self.records = records
        self.cache_size = cache_size
        self._deals: OrderedDict[str, Any] = OrderedDict()

    async def _deal_row(self, deal_id: str) -> Any:
        row = self._deals.get(deal_id)
        if row is not None:
            self._deals.move_to_end(deal_id)
            return row
        async with self.records.connection() as conn:
            row = await conn.fetchrow(_DEAL, deal_id)
        if row is not None:  # archived: it never changes again
            self._deals[deal_id] = row
            if len(self._deals) > self.cache_size:
                self._deals.popitem(last=False)
        return row

    async def archived_count(self) -> int:
        """Deals archived so far (an index-only count over ``deals_archived``)."""
        async with self.records.connection() as conn:
            return int(await conn.fetchval(_ARCHIVED_COUNT))

    async def deal(self, deal_id: str) -> Deal | None:
        """The archived deal, with its last status (by this process's clock); None if
        the deal is not archived."""
        row = await self._deal_row(deal_id)
        return None if row is None else _deal(row, now_ms())

    async def claim(self, deal_id: str, user_id: str) -> ClaimResult:
        """A claim on a deal Redis does not have: the holder's voucher, or the refusal
        ``claim_voucher.lua`` gave last (in its order). ``DealNotFound`` if the deal is not
        archived; ``StoreUnavailable`` if it is archived but, by its times, still open
        (impossible for a deal archived after ``redeem_until``; never a guess)."""
        row = await self._deal_row(deal_id)
        if row is None:
            raise DealNotFound(deal_id=deal_id)
        deal = _deal(row, now_ms())
        async with self.records.connection() as conn:
            held = await conn.fetchrow(_HOLDER, user_id, deal_id)
        if held is not None:
            voucher = Voucher(
                held["id"],
                deal_id,
                user_id,
                deal.merchant_id,
                int(held["seq"]),
                int(held["claimed"]),
                deal.redeem_until_ms,
            )
            return ClaimResult(voucher, is_new=False, inventory_left=deal.inventory_left)
        if deal.status == CANCELLED:
            raise DealCancelled(deal_id=deal_id)
        if deal.status == ENDED:
            raise DealEnded(deal_id=deal_id)
        raise StoreUnavailable()

    async def voucher(self, voucher_id: str) -> HeldVoucher | None:
        """A voucher of an archived deal; None if there is none."""
        async with self.records.connection() as conn:
            row = await conn.fetchrow(_VOUCHER, voucher_id)
        if row is None:
            return None
        voucher = Voucher(
            row["id"],
            row["deal_id"],
            row["user_id"],
            row["merchant_id"],
            int(row["seq"]),
            int(row["claimed"]),
            int(row["redeem"]),
        )
        redeemed = row["redeemed"]
        return HeldVoucher(voucher, None if redeemed is None else int(redeemed))

    async def redeem(
        self,
        verified: VoucherToken,
        merchant_id: str,
        device_id: str,
        entry_id: str,
        at_ms: int | None,
        now_ms: int,
        drift_ms: int,
    ) -> tuple[str, int, int] | None:
        """Decide a redemption of an archived voucher as ``redeem_voucher.lua`` does
        (:class:`engine.redemptions.ArchivedVouchers`); None if it is not archived."""
        async with self.records.connection() as conn:
            row = await conn.fetchrow(_VOUCHER, verified.voucher_id)
            if row is None:
                return None
            if row["user_id"] != verified.user_id:
                return "unknown", 0, 0
            at = now_ms if at_ms is None else at_ms
            first = None
            if row["redeemed"] is not None:
                first = (int(row["redeemed"]), row["first_merchant"], row["first_entry"])
            for _attempt in range(2):
                decided = await self._decide(
                    conn,
                    verified,
                    row,
                    merchant_id,
                    device_id,
                    entry_id,
                    at,
                    now_ms,
                    drift_ms,
                    first,
                )
                if decided is not None:
                    return decided
                # Another upload inserted the first redemption meanwhile: decide again.
                again = await conn.fetchrow(_FIRST, verified.voucher_id)
                first = (int(again["at"]), again["merchant_id"], again["entry_id"])
        raise AssertionError("a first redemption that is neither there nor inserted")

    async def _decide(
        self,
        conn: Any,
        verified: VoucherToken,
        row: Any,
        merchant_id: str,
        device_id: str,
        entry_id: str,
        at: int,
        now: int,
        drift_ms: int,
        first: tuple[int, str, str] | None,
    ) -> tuple[str, int, int] | None:
        """One decision, in the script's order; None if the first redemption appeared
        between reading and inserting it."""
        first_at = first[0] if first else 0
        if first is not None and entry_id and first[2] == entry_id and first[1] == merchant_id:
            return "accepted", first_at, first_at
        if at > now + drift_ms or at < int(row["claimed"]) - drift_ms:
            return "implausible", at, first_at
        if at >= verified.expires_at_s * 1000:
            return "expired", at, first_at
        if first is not None:
            if not entry_id:
                return "already", at, first_at
            await conn.execute(
                _INSERT_CONFLICT,
                verified.voucher_id,
                verified.deal_id,
                merchant_id,
                at,
                first_at,
                device_id,
                entry_id,
            )
            return "conflict", at, first_at
        inserted = await conn.fetchval(
            _INSERT_FIRST,
            verified.voucher_id,
            verified.deal_id,
            merchant_id,
            at,
            device_id,
            entry_id,
        )
        return ("accepted", at, at) if inserted is not None else None


def _deal(row: Any, now: int) -> Deal:
    total = int(row["inventory_total"])
    issued = int(row["issued"])
    cancelled = row["cancelled"]
    return Deal(
        id=row["id"],
        merchant_id=row["merchant_id"],
        title=row["title"],
        description=row["description"] or "",
        lat=float(row["lat"]),
        lng=float(row["lng"]),
        inventory_total=total,
        inventory_left=max(total - issued, 0),
        seq=issued,
        starts_at_ms=int(row["starts"]),
        ends_at_ms=int(row["ends"]),
        redeem_until_ms=int(row["redeem"]),
        cancelled_at_ms=None if cancelled is None else int(cancelled),
        now_ms=now,
    )
