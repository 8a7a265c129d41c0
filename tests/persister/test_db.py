"""Migrations and the asyncpg boundary."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from database.pool import Database
from engine import claims
from engine.deals import create_deal
from engine.errors import DatabaseUnavailable
from engine.settings import Settings
from engine.store import Store
from persister import cli
from persister.schema import migrate, migrations
from persister.worker import Persister
from tests.helpers import new_deal
from tests.persister.conftest import wait_caught_up


async def test_migrate_is_idempotent_and_records_versions(
    db_url: str, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await migrate(db_url) == []  # the fixture already migrated
    assert await cli.migrate(Settings(database_url=db_url)) == 0
    assert "up to date" in capsys.readouterr().out
    versions = [r["version"] for r in await pg.fetch("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in migrations()]
    await pg.execute("INSERT INTO vouchers VALUES ('v1', 'd1', 1, 'u1', now())")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute("INSERT INTO vouchers VALUES ('v2', 'd1', 1, 'u2', now())")
    with pytest.raises(asyncpg.UniqueViolationError):
        await pg.execute("INSERT INTO vouchers VALUES ('v3', 'd1', 2, 'u1', now())")


async def test_unreachable_postgres_is_database_unavailable() -> None:
    db = Database("postgresql://postgres@127.0.0.1:1/none", timeout_s=1.0)
    await db.open()
    try:
        assert await db.ping() is False
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction() as conn:
                await conn.execute("SELECT 1")
    finally:
        await db.close()
    with pytest.raises(DatabaseUnavailable):
        await migrate("postgresql://postgres@127.0.0.1:1/none")


async def _terminate_others(pg: asyncpg.Connection) -> None:
    """Drop every other session on this database (the persister's pool reconnects)."""
    await pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )


async def test_cancelled_and_read_only_writes_back_off_then_land(
    psettings: Settings, pstore: Store, pg: asyncpg.Connection, db_url: str
) -> None:
    """A statement timeout (57014), sessions killed (57P01) and a read-only database (25006,
    a standby after a failover): the persister keeps running and backing off; once
    PostgreSQL takes writes again, everything lands and nothing is dead-lettered."""
    name = db_url.rsplit("/", 1)[1]
    deal = await create_deal(pstore, new_deal(100))
    first = await _claim_many(pstore, deal.id, range(20))
    locker = await asyncpg.connect(db_url)  # holds the tables so that writes time out
    tx = locker.transaction()
    await tx.start()
    await locker.execute("LOCK TABLE deals, vouchers IN ACCESS EXCLUSIVE MODE")
    await pg.execute(f"ALTER DATABASE \"{name}\" SET statement_timeout = '300ms'")
    settings = psettings.with_(persister_backoff_max_s=0.3)
    store = await Store.connect(settings)
    db = Database(db_url)
    await db.open()
    p = Persister(settings, store, db, "p-down")
    task = asyncio.create_task(p.run())
    try:
        await asyncio.sleep(1.5)  # several writes cancelled by the statement timeout
        assert not task.done(), task.exception()
        assert await locker.fetchval("SELECT count(*) FROM vouchers") == 0
        await tx.rollback()
        await locker.close()
        await wait_caught_up(pstore)
        assert p.stats.db_down_s > 0

        await pg.execute(f'ALTER DATABASE "{name}" RESET statement_timeout')
        await pg.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        await _terminate_others(pg)
        second = await _claim_many(pstore, deal.id, range(20, 40))
        await asyncio.sleep(1.5)  # every write refused: read-only transaction
        assert not task.done(), task.exception()
        assert await pg.fetchval("SELECT count(*) FROM vouchers") == 20
        await pg.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await _terminate_others(pg)
        await wait_caught_up(pstore)
    finally:
        p.stop()
        await asyncio.wait_for(task, 10)
        await db.close()
        await store.close()
    got = {r["id"]: r["user_id"] for r in await pg.fetch("SELECT id, user_id FROM vouchers")}
    assert got == {**first, **second}
    assert await pg.fetchval("SELECT count(*) FROM dead_letters") == 0


async def _claim_many(store: Store, deal_id: str, users: range) -> dict[str, str]:
    out = await asyncio.gather(*(claims.claim(store, deal_id, f"u-{i}") for i in users))
    return {r.voucher.voucher_id: r.voucher.user_id for r in out if r.is_new}
