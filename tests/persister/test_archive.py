"""The archiver against real Redis and PostgreSQL: only what PostgreSQL holds leaves Redis,
once, whatever runs beside it or is killed in the middle."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from database.pool import Database
from engine import claims, redemptions
from engine.archive import count_due
from engine.deals import NewDeal, cancel_deal, create_deal
from engine.settings import Settings
from engine.store import Store
from engine.times import MS_PER_DAY, now_ms
from engine.vouchers import VoucherSigner
from persister import cli
from persister.archive import archive_due
from tests.persister.conftest import (
    PersisterProcess,
    running_persister,
    wait_caught_up,
)

FAR_FUTURE_MS = 400 * MS_PER_DAY  # past any deal's archive time here (redeem + 14 days)


def _deal(inventory: int = 5, merchant: str = "m-1") -> NewDeal:
    now = now_ms()
    return NewDeal(
        merchant,
        "t",
        "",
        1.0,
        2.0,
        inventory,
        now - 60_000,
        now + 3_600_000,
        now + 3_600_000 + MS_PER_DAY,
    )


async def _later(store: Store) -> int:
    return await store.server_time_ms() + FAR_FUTURE_MS


async def _redis_keys(store: Store) -> set[str]:
    return {str(k) async for k in store.client.scan_iter(match="fs:*", count=1000)}


async def _deal_keys(store: Store, deal_id: str) -> int:
    k = store.keys.for_deal(deal_id)
    return int(await store.client.exists(k.deal, k.claimers, k.vouchers, k.redemptions))


async def _with_db(settings: Settings) -> Database:
    db = Database(settings.database_url or "")
    await db.open()
    return db


async def _populate(store: Store, deals: int = 4) -> list[str]:
    """Deals with claims, a redemption on each, a cancellation; returns their ids."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    ids = []
    for n in range(deals):
        deal = await create_deal(store, _deal())
        held = [(await claims.claim(store, deal.id, f"u-{i}")).voucher for i in range(3)]
        await redemptions.redeem(store, signer, signer.sign(held[0]), "m-1")
        if n == 0:
            await cancel_deal(store, deal.id, "m-1")
        ids.append(deal.id)
    return ids


async def test_a_due_deal_leaves_redis_only_once_postgres_holds_all_of_it(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    ids = await _populate(pstore)
    db = await _with_db(psettings)
    try:
        later = await _later(pstore)
        # Nothing persisted yet: every due deal waits, nothing leaves Redis.
        run = await archive_due(pstore, db, now_ms=later)
        assert run.due == 4 and run.archived == []
        assert set(run.waiting.values()) == {"events in flight"}
        async with running_persister(psettings):
            await wait_caught_up(pstore)
        # Not due yet (Redis's own clock): left alone.
        assert (await archive_due(pstore, db)).due == 0
        run = await archive_due(pstore, db, now_ms=later)
        assert sorted(run.archived) == sorted(ids) and run.waiting == {}
    finally:
        await db.close()
    for deal_id in ids:
        assert await _deal_keys(pstore, deal_id) == 0
    assert await count_due(pstore, later) == 0
    assert not {k for k in await _redis_keys(pstore) if ":archive" in k or ":geo" in k}
    rows = await pg.fetch("SELECT id, archived_at FROM deals")
    assert sorted(r["id"] for r in rows) == sorted(ids)
    assert all(r["archived_at"] is not None for r in rows)
    assert await pg.fetchval("SELECT count(*) FROM vouchers") == 12
    assert await pg.fetchval("SELECT count(*) FROM redemptions") == 4


async def test_a_deal_stays_while_any_of_its_events_is_not_in_postgres(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    """Events still in the stream, then rows missing from PostgreSQL (a voucher, a first
    redemption, a cancellation): each keeps its deal in Redis until it is written."""
    ids = await _populate(pstore, deals=4)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    signer = VoucherSigner(psettings.signing_keys_dir)
    await claims.claim(pstore, ids[1], "u-late")
    held = (await claims.claim(pstore, ids[2], "u-1")).voucher  # held before: no event
    await redemptions.redeem(pstore, signer, signer.sign(held), "m-1")
    await cancel_deal(pstore, ids[3], "m-1")
    db = await _with_db(psettings)
    try:
        later = await _later(pstore)
        run = await archive_due(pstore, db, now_ms=later)
        assert run.archived == [ids[0]]
        assert run.waiting == dict.fromkeys(ids[1:], "events in flight")
        async with running_persister(psettings):
            await wait_caught_up(pstore)
        await pg.execute("DELETE FROM vouchers WHERE deal_id = $1 AND user_id = 'u-late'", ids[1])
        await pg.execute("DELETE FROM redemptions WHERE voucher_id = $1", held.voucher_id)
        await pg.execute("UPDATE deals SET cancelled_at = NULL WHERE id = $1", ids[3])
        run = await archive_due(pstore, db, now_ms=later)
        assert run.archived == []
        assert run.waiting == {
            ids[1]: "vouchers not all in PostgreSQL",
            ids[2]: "redemptions not all in PostgreSQL",
            ids[3]: "cancellation not in PostgreSQL",
        }
        for deal_id in ids[1:]:
            assert await _deal_keys(pstore, deal_id) == 4
        assert await pg.fetchval("SELECT count(*) FROM deals WHERE archived_at IS NOT NULL") == 1
        # The stream still holds the events: replay writes them again, and they go.
        assert await cli.replay(psettings, from_id="-", to_id="+") == 0
        capsys.readouterr()
        run = await archive_due(pstore, db, now_ms=later)
        assert sorted(run.archived) == sorted(ids[1:])
    finally:
        await db.close()


async def test_two_archivers_at_once_archive_each_deal_once(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    ids = await _populate(pstore, deals=12)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    later = await _later(pstore)
    stores = [await Store.connect(psettings) for _ in range(2)]
    dbs = [await _with_db(psettings) for _ in range(2)]
    try:
        runs = await asyncio.gather(
            *(archive_due(s, d, now_ms=later, batch=5) for s, d in zip(stores, dbs, strict=True))
        )
        marked = dict(await pg.fetch("SELECT id, archived_at FROM deals"))
        again = await archive_due(stores[0], dbs[0], now_ms=later)
    finally:
        for d in dbs:
            await d.close()
        for s in stores:
            await s.close()
    archived = [d for run in runs for d in run.archived]
    assert sorted(set(archived)) == sorted(ids)  # each by one of them, or both saw it whole
    assert again.due == 0
    assert dict(await pg.fetch("SELECT id, archived_at FROM deals")) == marked
    assert all(at is not None for at in marked.values())


async def test_deals_whose_keys_reached_their_deadline_are_marked_and_leave_the_index(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection
) -> None:
    """No archiver ran for weeks: the keys expired (the backstop); the next pass records
    the deal as archived (PostgreSQL has it) and empties the index."""
    ids = await _populate(pstore, deals=2)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    for deal_id in ids:
        k = pstore.keys.for_deal(deal_id)
        for key in (k.deal, k.claimers, k.vouchers, k.redemptions):
            await pstore.client.pexpireat(key, 1)  # as the deadline would
    db = await _with_db(psettings)
    try:
        run = await archive_due(pstore, db, now_ms=await _later(pstore))
    finally:
        await db.close()
    assert sorted(run.expired) == sorted(ids) and run.archived == []
    assert await count_due(pstore, await _later(pstore)) == 0
    assert await pg.fetchval("SELECT count(*) FROM deals WHERE archived_at IS NOT NULL") == 2


async def test_dry_run_changes_nothing_and_says_what_it_would_archive(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await _populate(pstore, deals=2)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    before = await _redis_keys(pstore)
    settings = psettings.with_(archive_grace_s=0.0)
    code = await cli.archive(settings, dry_run=True)
    out = capsys.readouterr().out
    # Not due by Redis's clock: redeem_until is a day away.
    assert code == 0 and "would archive 0 deal(s) of 0 due" in out
    await pstore.client.zadd(pstore.keys.for_deal(ids[0]).archive, {ids[0]: 1})
    code = await cli.archive(settings, dry_run=True)
    out = capsys.readouterr().out
    assert f"would archive {ids[0]}" in out and "would archive 1 deal(s) of 1 due" in out
    assert await _redis_keys(pstore) == before
    assert await pg.fetchval("SELECT count(*) FROM deals WHERE archived_at IS NOT NULL") == 0
    code = await cli.archive(settings, dry_run=False)
    assert f"archived {ids[0]}" in capsys.readouterr().out
    assert await _deal_keys(pstore, ids[0]) == 0 and await _deal_keys(pstore, ids[1]) == 4


async def test_reconcile_and_rebuild_leave_archived_deals_alone(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await _populate(pstore, deals=3)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
        await pstore.client.zadd(pstore.keys.for_deal(ids[0]).archive, {ids[0]: 1})
        db = await _with_db(psettings)
        try:
            assert (await archive_due(pstore, db)).archived == [ids[0]]
        finally:
            await db.close()
        code = await cli.reconcile(psettings, wait_s=5.0)
        out = capsys.readouterr().out
        assert code == 0, out
        assert "0 difference(s) over 2 deal(s)" in out
    await pstore.client.flushall()
    code = await cli.rebuild_redis(psettings, force=False)
    out = capsys.readouterr().out
    assert code == 0 and "restored 2 deal(s)" in out and "1 archived deal(s) left" in out
    assert await _deal_keys(pstore, ids[0]) == 0
    for deal_id in ids[1:]:
        k = pstore.keys.for_deal(deal_id)
        assert await pstore.client.pexpiretime(k.deal) > now_ms() + 7 * MS_PER_DAY
        assert await pstore.client.zscore(k.archive, deal_id) is not None


async def _wait_update_blocked(pg: asyncpg.Connection, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND query ILIKE '%UPDATE deals SET archived_at%'"
    ):
        assert time.monotonic() < deadline, "no archive mark waiting for its lock"
        await asyncio.sleep(0.05)


async def test_a_persister_killed_in_the_middle_of_archiving_loses_nothing(
    psettings: Settings,
    pstore: Store,
    pg: asyncpg.Connection,
    db_url: str,
    spawn_persister: Callable[..., PersisterProcess],
) -> None:
    """SIGKILL while the archive mark waits on a lock the test holds on ``deals``: nothing
    is marked or removed; the next persister archives every deal exactly once."""
    ids = await _populate(pstore, deals=3)
    for deal_id in ids:  # due now
        await pstore.client.zadd(pstore.keys.for_deal(deal_id).archive, {deal_id: 1})
    env = {"FLASHSALE_ARCHIVE_INTERVAL": "0.3s"}
    first = spawn_persister(psettings, **env)
    await wait_caught_up(pstore)
    lock = await asyncpg.connect(db_url)
    try:
        await lock.execute("BEGIN; LOCK TABLE deals IN SHARE MODE")
        await _wait_update_blocked(pg)
        first.kill()
    finally:
        await lock.close()
    assert await pg.fetchval("SELECT count(*) FROM deals WHERE archived_at IS NOT NULL") == 0
    for deal_id in ids:
        assert await _deal_keys(pstore, deal_id) == 4
    second = spawn_persister(psettings, **env)
    deadline = time.monotonic() + 30
    while await count_due(pstore, await pstore.server_time_ms()):
        assert time.monotonic() < deadline, second.output()
        await asyncio.sleep(0.1)
    await second.wait_for_output("archive pass: archived 3 deal(s) of 3 due")
    second.terminate()
    assert "archived" not in first.output()
    marked = await pg.fetch("SELECT id, archived_at FROM deals WHERE archived_at IS NOT NULL")
    assert sorted(r["id"] for r in marked) == sorted(ids)
    for deal_id in ids:
        assert await _deal_keys(pstore, deal_id) == 0
    assert await pg.fetchval("SELECT count(*) FROM vouchers") == 9
    assert await pg.fetchval("SELECT count(*) FROM redemptions") == 3


async def test_a_mark_without_removal_is_completed_by_the_next_pass(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Killed between the mark and the removal (simulated: the mark alone): Redis still
    answers for the deal; the next pass removes it and keeps the first mark's time."""
    ids = await _populate(pstore, deals=1)
    async with running_persister(psettings):
        await wait_caught_up(pstore)
    await pg.execute("UPDATE deals SET archived_at = 'epoch' WHERE id = $1", ids[0])
    assert (await claims.claim(pstore, ids[0], "u-0")).outcome == "already"
    db = await _with_db(psettings)
    try:
        run = await archive_due(pstore, db, now_ms=await _later(pstore))
    finally:
        await db.close()
    assert run.archived == ids
    assert await _deal_keys(pstore, ids[0]) == 0
    assert str(await pg.fetchval("SELECT archived_at FROM deals")).startswith("1970-01-01")
