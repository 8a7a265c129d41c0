"""The persister's PostgreSQL boundary: pool, migrations, and asyncpg error translation.

Every asyncpg exception the persister can meet is translated here, and nowhere else:

- PostgreSQL cannot be reached, went away mid-transaction, or cannot take writes for
  now (statement cancelled or timed out, disk full, out of memory, I/O error, shutting
  down, a read-only standby after a failover) -> ``DatabaseUnavailable`` (retry the same
  batch later, with backoff);
- a transient clash between transactions (deadlock, serialization) -> ``Transient``
  (retry at once);
- PostgreSQL refused the data itself (bad encoding, out of range, cardinality,
  constraint) -> ``Refused`` (isolate the entry, dead-letter it after a few attempts).

Anything else (a syntax error, a missing table) is our bug or an unmigrated database:
it propagates, the process stops, and the entries stay pending for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from engine.errors import DatabaseUnavailable, StartupError

log = logging.getLogger(__name__)

_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionFailureError,
)
_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
)
# SQLSTATE classes meaning "PostgreSQL cannot take this now, try later": 08 connection
# exception, 53 insufficient resources (disk full, out of memory), 57 operator
# intervention (statement timeout or cancel 57014, admin shutdown 57P01, cannot connect
# now 57P03), 58 system error (I/O); plus 25006, a read-only transaction (a standby
# after a failover). api/records.py has the same tuple under the same name: DESIGN.md
# keeps api/ and persister/ independent, so each boundary module carries its own copy.
_DOWN_CLASSES = ("08", "53", "57", "58")
_READ_ONLY = "25006"
# SQLSTATE classes meaning "this data cannot be stored": 21 cardinality, 22 data
# exception, 23 integrity constraint, 54 program limit (e.g. a value too large to index).
_REFUSED_CLASSES = ("21", "22", "23", "54")

# Serialises concurrent `migrate` runs (two `flashsale up`, a deploy and a persister).
_MIGRATION_LOCK = 0x666C_6173_6873_616C  # "flashsal"
_MIGRATION_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


class Transient(Exception):
    """Two transactions clashed (deadlock, serialization failure): retry at once."""


class Refused(Exception):
    """PostgreSQL refused the data itself: retrying the same rows will not help."""


def _is_down(exc: BaseException) -> bool:
    if isinstance(exc, _DOWN):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and (
        state[:2] in _DOWN_CLASSES or state == _READ_ONLY
    )


def _refused(exc: BaseException) -> bool:
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and state[:2] in _REFUSED_CLASSES


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Translate asyncpg failures inside the block (see the module docstring)."""
    try:
        yield
    except _TRANSIENT as exc:
        raise Transient(str(exc)) from exc
    except _DOWN as exc:
        raise DatabaseUnavailable() from exc
    except asyncpg.PostgresError as exc:
        if _is_down(exc):
            raise DatabaseUnavailable() from exc
        if _refused(exc):
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        raise


class Database:
    """A small asyncpg pool that connects lazily, so a persister starts while PostgreSQL is down."""

    def __init__(self, dsn: str, *, max_size: int = 4, timeout_s: float = 5.0) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s
        self.max_size = max_size
        self._pool: Any = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.max_size,
            timeout=self.timeout_s,
            command_timeout=60,
            # A connection that PostgreSQL dropped is found out on its next use anyway.
            max_inactive_connection_lifetime=60,
        )

    async def close(self) -> None:
        if self._pool is not None:
            try:
                async with asyncio.timeout(5):
                    await self._pool.close()
            except _DOWN:  # TimeoutError is an OSError
                self._pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection, with every asyncpg failure inside translated."""
        async with translated():
            async with asyncio.timeout(self.timeout_s * 2):
                conn = await self._pool.acquire(timeout=self.timeout_s)
            try:
                yield conn
            finally:
                await self._pool.release(conn, timeout=self.timeout_s)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """One transaction on a pooled connection (commit on exit, rollback on error)."""
        async with self.connection() as conn, translated(), conn.transaction():
            yield conn

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except DatabaseUnavailable:
            return False


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered ``persister/migrations/NNNN_name.sql`` files, in order."""
    found = []
    for entry in resources.files("persister.migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise StartupError(f"two migrations share a number: {[m.name for m in found]}")
    return found


async def migrate(dsn: str) -> list[str]:
    """Apply the migrations not yet applied, each in its own transaction; return their names."""
    applied: list[str] = []
    async with translated():
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for m in migrations():
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
                log.info("applied migration %s", m.name)
                applied.append(m.name)
        finally:
            await conn.close()
    return applied


async def check_schema(conn: Any) -> None:
    """Refuse to run against a database that ``migrate`` has not brought up to date."""
    latest = migrations()[-1].version
    try:
        have = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        have = None
    if have is None or have < latest:
        raise StartupError(
            f"the database schema is at version {have or 0}, this code needs {latest}: "
            "run `flashsale migrate` first"
        )
