"""The archiver: due deals leave Redis once PostgreSQL holds every event of them.

A pass, per partition, for the deals whose archive time has come (``engine.archive``):

1. **In flight.** The deals named by entries the persister's group has not acknowledged
   (pending, or not yet delivered) wait: their events are on the way. A partition with more
   than :data:`MAX_IN_FLIGHT_SCAN` such entries waits whole (the persister is behind).
2. **Redis.** Each deal's ``seq``, cancellation, claimers and first redemptions.
3. **PostgreSQL.** The deal's row, complete; ``count(vouchers) = max(seq) = seq`` (with the
   unique ``(deal_id, seq)``, every voucher 1..seq); the cancellation if Redis has one;
   every voucher of Redis's redemptions hash in ``redemptions``; no dead letter naming it.
   Redemption conflicts leave nothing in Redis to compare: they are covered by step 1.
4. **Mark.** ``deals.archived_at`` is set (once: ``WHERE archived_at IS NULL``) and
   committed, for the whole chunk in one statement.
5. **Remove.** ``archive_deal`` (one Lua call per deal) removes the deal's keys and its
   index entries, unless its ``seq``, cancellation or redemption count changed since step
   2: then nothing is removed and the deal is looked at again next pass.

Marking before removing is what makes a crash harmless. Killed before 4 commits, nothing
happened. Killed between 4 and 5, PostgreSQL says archived while Redis still holds the
deal: every route still answers from Redis (PostgreSQL answers only for deals Redis no
longer has), the deal is still in the index, and the next pass checks it again and
removes it. Several archivers at once: the mark is set once, the Lua call is atomic and
the second one finds the deal ``gone``. Nothing is ever removed that step 3 did not find
in PostgreSQL, because anything that changes those values after step 2 makes step 5 refuse.

Deals whose keys reached their deadline first (no archiver ran for a long time) are found
``gone`` in step 2: once nothing of them is in flight they are marked archived (if
PostgreSQL has their row) and leave the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

from database.errors import Transient
from database.pool import Database
from engine.archive import ARCHIVED, CHANGED, DealState, deal_states, due_deals, redeemed_vouchers
from engine.archive import remove_deal as remove_keys
from engine.errors import Unavailable
from engine.keys import STREAM_GROUP, archiver_lease_key
from engine.settings import Settings
from engine.store import Store
from persister.consumer import ack_floor

log = logging.getLogger(__name__)

# Unacknowledged entries read from one partition stream to find the deals in flight: a
# partition further behind than this is left for a later pass (bounded work per pass).
MAX_IN_FLIGHT_SCAN = 20_000
# Deals checked in PostgreSQL per query, and marked per statement.
CHUNK = 200

_CHECK = """
SELECT d.id, d.merchant_id IS NOT NULL AS complete, d.cancelled_at IS NOT NULL AS cancelled,
       (SELECT count(*) FROM vouchers v WHERE v.deal_id = d.id) AS vouchers,
       (SELECT coalesce(max(v.seq), 0) FROM vouchers v WHERE v.deal_id = d.id) AS max_seq,
       (SELECT count(*) FROM redemptions r WHERE r.deal_id = d.id) AS redemptions,
       EXISTS (SELECT 1 FROM dead_letters x WHERE x.fields ->> 'deal' = d.id) AS dead
FROM deals d
WHERE d.id = ANY($1::text[])
"""

_REDEEMED_PRESENT = "SELECT count(*) FROM redemptions WHERE voucher_id = ANY($1::text[])"

# Of the given vouchers, how many have their first redemption here, per deal.
_REDEEMED_PRESENT_BY_DEAL = """
SELECT deal_id, count(*) AS present FROM redemptions
WHERE voucher_id = ANY($1::text[])
GROUP BY deal_id
"""

# A deal with at most this many first redemptions has them read in the chunk's one round
# trip (HKEYS: at most CHUNK * this ids); a bigger one page by page (HSCAN), so that no
# reply grows with a deal's size.
SMALL_REDEEMED = 100

_MARK = """
UPDATE deals SET archived_at = now()
WHERE id = ANY($1::text[]) AND archived_at IS NULL AND merchant_id IS NOT NULL
"""


@dataclass(slots=True)
class ArchiveRun:
    """What one pass did (or, dry, would do)."""

    dry_run: bool = False
    due: int = 0
    archived: list[str] = field(default_factory=list)
    # Deals whose keys had expired at their deadline before any archiver took them.
    expired: list[str] = field(default_factory=list)
    # Due deals left in Redis this pass, with the reason.
    waiting: dict[str, str] = field(default_factory=dict)
    # Index entries naming a deal that neither Redis nor PostgreSQL holds (dropped).
    lost: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verb = "would archive" if self.dry_run else "archived"
        reasons: dict[str, int] = {}
        for why in self.waiting.values():
            reasons[why] = reasons.get(why, 0) + 1
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        return (
            f"{verb} {len(self.archived)} deal(s) of {self.due} due"
            + (f"; {len(self.expired)} past their key deadline" if self.expired else "")
            + (f"; {len(self.waiting)} waiting ({why})" if self.waiting else "")
            + (f"; {len(self.lost)} unknown dropped from the index" if self.lost else "")
        )


async def archive_due(
    store: Store,
    db: Database,
    *,
    now_ms: int | None = None,
    dry_run: bool = False,
    batch: int = 500,
    work_fraction: float = 1.0,
) -> ArchiveRun:
    """One pass over every partition: archive what is due at ``now_ms`` (Redis's clock by
    default; tests pass their own) and complete in PostgreSQL.

    With ``work_fraction`` below 1, the pass rests after each chunk so that it works that
    share of the wall time at most (the claim race keeps its CPU on a shared machine).
    """
    now = await store.server_time_ms() if now_ms is None else now_ms
    run = ArchiveRun(dry_run=dry_run)
    for partition in range(store.keys.partitions):
        offset = 0  # deals left waiting stay at the front of the index: step over them
        while True:
            ids = await due_deals(store, partition, now, offset=offset, count=batch)
            if not ids:
                break
            run.due += len(ids)
            waiting_before = len(run.waiting)
            flying = await _in_flight(store, store.keys.all_events()[partition])
            for i in range(0, len(ids), CHUNK):
                started = time.monotonic()
                await _chunk(store, db, ids[i : i + CHUNK], flying, dry_run, run)
                if work_fraction < 1.0:
                    worked = time.monotonic() - started
                    await asyncio.sleep(worked * (1.0 / max(work_fraction, 0.01) - 1.0))
            # Dry, nothing leaves the index: every id read stays in front.
            offset += len(ids) if dry_run else len(run.waiting) - waiting_before
            if len(ids) < batch:
                break
    return run


async def _in_flight(store: Store, stream: str) -> set[str] | None:
    """Deal ids named by entries of ``stream`` not yet acknowledged; None if there are
    more than ``MAX_IN_FLIGHT_SCAN`` (every due deal of the partition then waits)."""
    start = "-"
    for group in await store.stream_groups(stream):
        if group["name"] == STREAM_GROUP:
            start = await ack_floor(store, stream, group)
    entries = await store.stream_range(stream, start, count=MAX_IN_FLIGHT_SCAN + 1)
    if len(entries) > MAX_IN_FLIGHT_SCAN:
        return None
    return {fields.get("deal", "") for _id, fields in entries if fields}


async def _chunk(
    store: Store,
    db: Database,
    ids: list[str],
    flying: set[str] | None,
    dry_run: bool,
    run: ArchiveRun,
) -> None:
    states = await deal_states(store, ids)
    async with db.connection() as conn:
        rows = {r["id"]: r for r in await conn.fetch(_CHECK, ids)}
    ready: list[DealState] = []
    expired: list[DealState] = []
    lost: list[DealState] = []
    for state in states:
        row = rows.get(state.deal_id)
        if flying is None:
            run.waiting[state.deal_id] = "persister behind"
        elif state.deal_id in flying:
            run.waiting[state.deal_id] = "events in flight"
        elif not state.exists:
            (expired if row is not None and row["complete"] else lost).append(state)
        else:
            why = _incomplete(state, row)
            if why is None:
                ready.append(state)
            else:
                run.waiting[state.deal_id] = why
    missing = await _redemptions_missing(store, db, [s for s in ready if s.redeemed])
    for deal_id in missing:
        run.waiting[deal_id] = "redemptions not all in PostgreSQL"
    ready = [s for s in ready if s.deal_id not in missing]
    if dry_run:
        run.archived += [s.deal_id for s in ready]
        run.expired += [s.deal_id for s in expired]
        run.lost += [s.deal_id for s in lost]
        return
    if ready or expired:
        async with db.transaction() as conn:
            await conn.execute(_MARK, [s.deal_id for s in ready + expired])
    for state in lost:
        log.error(
            "the archive index names deal %s, which neither Redis nor PostgreSQL "
            "holds: dropping it from the index",
            state.deal_id,
        )
    lost_ids = {s.deal_id for s in lost}
    expired_ids = {s.deal_id for s in expired}
    targets = ready + expired + lost
    outcomes = await asyncio.gather(*(remove_keys(store, s) for s in targets))
    for state, (outcome, detail) in zip(targets, outcomes, strict=True):
        if outcome == CHANGED:
            run.waiting[state.deal_id] = f"changed ({detail})"
        elif state.deal_id in lost_ids:
            run.lost.append(state.deal_id)
        elif state.deal_id in expired_ids:
            run.expired.append(state.deal_id)
        elif outcome == ARCHIVED:
            run.archived.append(state.deal_id)
        # else 'gone' for a deal found whole a moment ago: another archiver was first.


def _incomplete(state: DealState, row: Any) -> str | None:
    """Why PostgreSQL does not hold all of the deal yet (None: it does, but for the
    redemptions' ids, checked next)."""
    if row is None or not row["complete"]:
        return "deal not in PostgreSQL"
    if state.holders != state.seq:
        return "claimers differ from seq (see reconcile)"
    if row["vouchers"] != state.seq or row["max_seq"] != state.seq:
        return "vouchers not all in PostgreSQL"
    if state.cancelled and not row["cancelled"]:
        return "cancellation not in PostgreSQL"
    if row["redemptions"] < state.redeemed:
        return "redemptions not all in PostgreSQL"
    if row["dead"]:
        return "a dead-lettered event"
    return None


async def _redemptions_missing(store: Store, db: Database, states: list[DealState]) -> set[str]:
    """The deals whose redemptions hash names a voucher without its row in PostgreSQL."""
    missing: set[str] = set()
    small = [s for s in states if s.redeemed <= SMALL_REDEEMED]
    if small:
        pipe = store.pipeline()
        for state in small:
            pipe.hkeys(store.keys.for_deal(state.deal_id).redemptions)
        ids_by_deal = dict(zip((s.deal_id for s in small), await pipe.execute(), strict=True))
        every = [v for ids in ids_by_deal.values() for v in ids]
        async with db.connection() as conn:
            rows = await conn.fetch(_REDEEMED_PRESENT_BY_DEAL, every)
        present = {r["deal_id"]: int(r["present"]) for r in rows}
        missing |= {d for d, ids in ids_by_deal.items() if present.get(d, 0) != len(ids)}
    for state in states:
        if state.redeemed <= SMALL_REDEEMED:
            continue
        async for page in redeemed_vouchers(store, state.deal_id):
            async with db.connection() as conn:
                if await conn.fetchval(_REDEEMED_PRESENT, page) != len(page):
                    missing.add(state.deal_id)
                    break
    return missing


async def archive_forever(
    settings: Settings, store: Store, db: Database, stop: asyncio.Event
) -> None:
    """The persister's archiver, until ``stop``: every ``archive_interval_s`` (jittered)
    each persister tries to start a pass, and one per interval does, over all of them
    (a key that lapses after the interval; a killed archiver delays the next pass by at
    most that). Two passes at once would be safe, only wasted work."""
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    interval_s = settings.archive_interval_s
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s * random.uniform(0.5, 1.0))
        if stop.is_set():
            return
        try:
            ttl_ms = max(int(interval_s * 1000), 100)
            if not await store.set_if_absent(archiver_lease_key(), token, ttl_ms=ttl_ms):
                continue
            run = await archive_due(
                store,
                db,
                batch=settings.archive_batch,
                work_fraction=settings.archive_work_fraction,
            )
        except (Unavailable, Transient) as exc:
            # A pass cut anywhere is safe (marked first, removed after): the next one goes on.
            log.warning("archive pass stopped (%s); trying again in %.0fs", exc, interval_s)
            continue
        if run.due:
            log.info("archive pass: %s", run.summary())
