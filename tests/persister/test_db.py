"""Migrations and the asyncpg boundary."""

from __future__ import annotations

import argparse

import asyncpg
import pytest

from engine.errors import DatabaseUnavailable
from engine.settings import Settings
from persister import cli
from persister.db import Database, migrate, migrations


async def test_migrate_is_idempotent_and_records_versions(
    db_url: str, pg: asyncpg.Connection, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await migrate(db_url) == []  # the fixture already migrated
    assert await cli.migrate(Settings(database_url=db_url), argparse.Namespace()) == 0
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
