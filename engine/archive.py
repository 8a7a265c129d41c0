"""The archive, Redis side: which deals are due, what of a deal the archiver checks, and
the one call that removes a deal's keys (``lua/archive_deal.lua``).

Each partition keeps an index of its deals by archive time (``fs:{pNN}:archive``, a ZSET
written by ``create_deal`` in the deal's own slot: ``redeem_until`` + the grace in force
when the deal was created, see :func:`engine.deals.archive_times`). The archiver, which
compares this with PostgreSQL, is ``persister/archive.py``: the engine knows nothing of it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.deals import DealHash
from engine.store import Store

ARCHIVED, GONE, CHANGED = "archived", "gone", "changed"


@dataclass(frozen=True, slots=True)
class DealState:
    """What the archiver checks of one deal in Redis (and ``archive_deal`` checks again)."""

    deal_id: str
    exists: bool  # False: no deal hash (archived before, or past its deadline)
    seq: int  # vouchers issued
    cancelled: str  # the cancellation time as stored, '' if not cancelled
    holders: int  # the claimers hash's length (== seq unless Redis went back in time)
    redeemed: int  # first redemptions (the redemptions hash's length)


async def due_deals(
    store: Store, partition: int, now_ms: int, *, offset: int = 0, count: int
) -> list[str]:
    """Up to ``count`` deals of ``partition`` whose archive time is at or before ``now_ms``,
    the longest due first, skipping the first ``offset``."""
    key = store.keys.all_archive()[partition]
    return await store.zrange_by_score(key, now_ms, offset=offset, count=count)


async def count_due(store: Store, now_ms: int) -> int:
    """Deals due over every partition (one ``ZCOUNT`` each, one round trip)."""
    pipe = store.pipeline()
    for key in store.keys.all_archive():
        pipe.zcount(key, now_ms)
    return sum(int(n) for n in await pipe.execute())


async def deal_states(store: Store, deal_ids: list[str]) -> list[DealState]:
    """Each deal's :class:`DealState`, read in one round trip (3 commands a deal)."""
    pipe = store.pipeline()
    for deal_id in deal_ids:
        k = store.keys.for_deal(deal_id)
        pipe.hmget(k.deal, DealHash.MERCHANT, DealHash.SEQ, DealHash.CANCELLED)
        pipe.hlen(k.claimers)
        pipe.hlen(k.redemptions)
    replies = await pipe.execute()
    out = []
    for n, deal_id in enumerate(deal_ids):
        (merchant, seq, cancelled), holders, redeemed = replies[3 * n : 3 * n + 3]
        out.append(
            DealState(
                deal_id=deal_id,
                exists=merchant is not None,
                seq=int(seq or 0),
                cancelled=cancelled or "",
                holders=int(holders),
                redeemed=int(redeemed),
            )
        )
    return out


async def redeemed_vouchers(
    store: Store, deal_id: str, page: int = 1000
) -> AsyncIterator[list[str]]:
    """The ids of a deal's redeemed vouchers, a page at a time (``HSCAN``: a deal of a
    million vouchers never becomes one reply)."""
    key = store.keys.for_deal(deal_id).redemptions
    cursor = 0
    while True:
        cursor, fields = await store.hscan(key, cursor, count=page)
        if fields:
            yield list(fields)
        if cursor == 0:
            return


async def remove_deal(store: Store, state: DealState) -> tuple[str, str]:
    """Remove the deal's keys unless it changed since ``state`` was read.

    Returns ``(outcome, detail)``: ``archived``, ``gone`` (nothing of it was left), or
    ``changed`` (nothing removed; ``detail`` names what changed).
    """
    k = store.keys.for_deal(state.deal_id)
    outcome, detail = await store.run(
        "archive_deal",
        (k.deal, k.claimers, k.vouchers, k.redemptions, k.archive, k.geo, k.geo_starts, k.geo_ends),
        (state.deal_id, state.seq, state.cancelled, state.redeemed),
    )
    return str(outcome), str(detail)
