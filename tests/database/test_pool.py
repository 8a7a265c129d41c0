"""The shared pool: it starts with PostgreSQL away, says so while it is, and recovers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from api.records import Records
from database.pool import Database
from engine.errors import DatabaseUnavailable
from flashsale.embedded import EmbeddedPostgres

USERS: dict[str, Callable[..., Database]] = {"api": Records, "persister": Database}


@pytest.mark.parametrize("user", USERS)
async def test_a_server_nobody_listens_on_is_unavailable(user: str) -> None:
    db = USERS[user]("postgresql://postgres@127.0.0.1:1/postgres", timeout_s=0.5)
    await db.open()  # lazily: opening does not connect
    try:
        assert await db.ping() is False
        with pytest.raises(DatabaseUnavailable):
            async with db.connection() as conn:
                await conn.execute("SELECT 1")
        with pytest.raises(DatabaseUnavailable):
            async with db.transaction() as conn:
                await conn.execute("SELECT 1")
    finally:
        await db.close()


async def test_a_stopped_server_is_unavailable_to_both_and_both_recover(
    own_postgres: EmbeddedPostgres,
) -> None:
    """PostgreSQL really stopped under pools holding connections, then started again."""
    pools = [Records(own_postgres.url, timeout_s=1.0), Database(own_postgres.url, timeout_s=1.0)]
    for db in pools:
        await db.open()
    try:
        for db in pools:
            assert await db.ping()  # each now holds an idle connection
        own_postgres.stop()
        for db in pools:
            with pytest.raises(DatabaseUnavailable):
                async with db.connection() as conn:
                    await conn.execute("SELECT 1")
            assert await db.ping() is False
        own_postgres.start()
        for db in pools:
            assert await db.ping()
    finally:
        for db in pools:
            await db.close()
