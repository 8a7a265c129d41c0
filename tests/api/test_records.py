"""The API's read side in PostgreSQL. Whether PostgreSQL is down is judged in one place,
with the persister: tests/database/test_errors.py and test_pool.py."""

from __future__ import annotations

import secrets

import asyncpg

from api.records import Records
from persister.schema import migrate


async def test_dead_letters_are_none_before_the_migrations_and_counted_after(
    database_url: str,
) -> None:
    name = "t_" + secrets.token_hex(6)
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = database_url.rsplit("/", 1)[0] + "/" + name
    records = Records(dsn)
    await records.open()
    try:
        assert await records.dead_letter_count() is None
        await migrate(dsn)
        assert await records.dead_letter_count() == 0
    finally:
        await records.close()
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
