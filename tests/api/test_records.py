"""The API's PostgreSQL boundary: "PostgreSQL cannot serve now" is 503, never 500."""

from __future__ import annotations

import pytest

from api.records import Records
from engine.errors import DatabaseUnavailable


async def test_a_statement_timeout_is_unavailable(database_url: str) -> None:
    records = Records(database_url)
    await records.open()
    try:
        with pytest.raises(DatabaseUnavailable):
            async with records.connection() as conn:
                await conn.execute("SET statement_timeout = 10")
                await conn.execute("SELECT pg_sleep(2)")
        assert await records.ping()  # the pool recovers by itself
    finally:
        await records.close()


async def test_a_read_only_standby_is_unavailable(database_url: str) -> None:
    records = Records(database_url)
    await records.open()
    try:
        with pytest.raises(DatabaseUnavailable):
            async with records.connection() as conn, conn.transaction(readonly=True):
                await conn.execute("CREATE TEMP TABLE t_ro (x int)")
    finally:
        await records.close()


async def test_a_bug_in_sql_stays_a_bug(database_url: str) -> None:
    """A syntax error is ours: it must not hide behind a 503."""
    import asyncpg

    records = Records(database_url)
    await records.open()
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            async with records.connection() as conn:
                await conn.execute("SELEC 1")
    finally:
        await records.close()


async def test_an_unreachable_server_is_unavailable() -> None:
    records = Records("postgresql://postgres@127.0.0.1:1/postgres", timeout_s=0.5)
    await records.open()
    try:
        assert not await records.ping()
        with pytest.raises(DatabaseUnavailable):
            async with records.connection():
                pass
    finally:
        await records.close()
