"""One definition of "PostgreSQL is down": real failures, judged alike by the API's pool
and the persister's.

Each case makes PostgreSQL really fail (a statement timeout, a read-only transaction, a
session killed by an administrator, a lock or deadlock clash, bad data, a bug) and checks
what both users see: the same translated error, from the same judgement of the asyncpg
exception underneath.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from api.records import Records
from database.errors import Refused, Transient, is_down
from database.pool import Database
from engine.errors import DatabaseUnavailable

Case = Callable[[Any, asyncpg.Connection], Awaitable[Any]]


async def _statement_timeout(conn: Any, other: asyncpg.Connection) -> None:
    await conn.execute("SET statement_timeout = 10")
    await conn.execute("SELECT pg_sleep(2)")


async def _read_only(conn: Any, other: asyncpg.Connection) -> None:
    # What a standby promoted away from us (or a read-only database) answers a write.
    await conn.execute("SET default_transaction_read_only = on")
    await conn.execute("CREATE TEMP TABLE t_ro (x int)")


async def _terminated(conn: Any, other: asyncpg.Connection) -> None:
    """An administrator ends the session while its statement runs (the answer is certain
    then; an idle session's end races with its next statement on the client side)."""
    pid = await conn.fetchval("SELECT pg_backend_pid()")
    running = asyncio.ensure_future(conn.execute("SELECT pg_sleep(30)"))
    active = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'"
    for _ in range(1000):  # until PostgreSQL runs the statement (10 s at most)
        if await other.fetchval(active, pid):
            break
        await asyncio.sleep(0.01)
    await other.execute("SELECT pg_terminate_backend($1)", pid)
    await running


async def _lock_timeout(conn: Any, other: asyncpg.Connection) -> None:
    await other.execute("SELECT pg_advisory_lock(7001)")
    try:
        await conn.execute("SET lock_timeout = 50")
        await conn.execute("SELECT pg_advisory_lock(7001)")
    finally:
        await other.execute("SELECT pg_advisory_unlock_all()")


async def _deadlock(conn: Any, other: asyncpg.Connection) -> None:
    await other.execute("SELECT pg_advisory_lock(7002)")
    await conn.execute("SELECT pg_advisory_lock(7003)")
    # conn waits first, so PostgreSQL's deadlock check (after deadlock_timeout) fires there.
    conn_waits = asyncio.ensure_future(conn.execute("SELECT pg_advisory_lock(7002)"))
    await asyncio.sleep(0.2)
    other_waits = asyncio.ensure_future(other.execute("SELECT pg_advisory_lock(7003)"))
    try:
        await conn_waits
    finally:
        await conn.execute("SELECT pg_advisory_unlock_all()")
        await other_waits
        await other.execute("SELECT pg_advisory_unlock_all()")


async def _bad_data(conn: Any, other: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT 1 / $1::int", 0)


async def _missing_table(conn: Any, other: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT count(*) FROM t_never_created")


async def _missing_column(conn: Any, other: asyncpg.Connection) -> None:
    await conn.fetchval("SELECT column_never_added FROM pg_class LIMIT 1")


async def _syntax_error(conn: Any, other: asyncpg.Connection) -> None:
    await conn.execute("SELEC 1")


# case: (what it does, what both users see, is it "down")
CASES: dict[str, tuple[Case, type[BaseException], bool]] = {
    "statement timeout (57014)": (_statement_timeout, DatabaseUnavailable, True),
    "read-only transaction (25006)": (_read_only, DatabaseUnavailable, True),
    "session terminated by an admin (57P01)": (_terminated, DatabaseUnavailable, True),
    "lock not available (55P03)": (_lock_timeout, Transient, False),
    "deadlock (40P01)": (_deadlock, Transient, False),
    "division by zero (22012)": (_bad_data, Refused, False),
    "table not migrated (42P01)": (_missing_table, DatabaseUnavailable, False),
    "column not migrated (42703)": (_missing_column, DatabaseUnavailable, False),
    "syntax error (42601)": (_syntax_error, asyncpg.PostgresSyntaxError, False),
}
USERS: dict[str, Callable[[str], Database]] = {
    "api": Records,  # as api/app.py opens it
    "persister": Database,  # as persister/worker.py and persister/cli.py open it
}


@pytest.fixture(params=USERS)
async def pool(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Database]:
    db = USERS[request.param](database_url)
    await db.open()
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def other(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A session of the test's own, next to the pool's."""
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize("case", CASES)
async def test_each_real_failure_is_judged_alike_by_the_api_and_the_persister(
    pool: Database, other: asyncpg.Connection, case: str
) -> None:
    make_fail, expected, down = CASES[case]
    with pytest.raises(expected) as caught:
        async with pool.connection() as conn:
            await make_fail(conn, other)
    underneath = caught.value.__cause__ or caught.value
    assert isinstance(underneath, asyncpg.PostgresError | OSError | asyncpg.InterfaceError)
    assert is_down(underneath) is down
    assert await pool.ping()  # the pool gets over it by itself


async def test_a_missing_table_says_the_database_is_not_migrated(pool: Database) -> None:
    with pytest.raises(DatabaseUnavailable, match="not been migrated"):
        async with pool.connection() as conn:
            await _missing_table(conn, conn)


def test_exceptions_that_are_not_postgresql_answers_are_judged_by_class() -> None:
    assert is_down(ConnectionRefusedError())
    assert is_down(TimeoutError())
    assert is_down(asyncpg.ConnectionDoesNotExistError("gone"))
    assert not is_down(ValueError("ours"))
    assert not is_down(RuntimeError("ours"))


def test_only_database_names_asyncpg_exceptions() -> None:
    """The boundary is whole: no module outside database/ catches or tests for one."""
    root = Path(__file__).resolve().parents[2]
    offenders = [
        f"{path.relative_to(root)}:{node.lineno} names asyncpg.{node.attr}"
        for folder in ("engine", "api", "persister", "flashsale")
        for path in sorted((root / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "asyncpg"
        and node.attr.endswith(("Error", "Exception"))
    ]
    assert offenders == []
