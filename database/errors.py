"""What an asyncpg failure means: the one definition of "PostgreSQL is down".

Every asyncpg exception that the API or the persister can meet is judged here:

- PostgreSQL cannot be reached, went away mid-transaction, or cannot serve for now
  (statement cancelled or timed out, disk full, out of memory, I/O error, shutting down,
  a read-only standby after a failover), or its schema has not been migrated yet (an
  undefined table or column: the code runs ahead of ``flashsale migrate``)
  -> ``DatabaseUnavailable`` (503 for the API; the persister retries the same batch later);
- a transient clash between transactions (deadlock, serialization, a lock not available)
  -> ``Transient`` (retry at once);
- PostgreSQL refused the data itself (bad encoding, out of range, cardinality,
  constraint) -> ``Refused`` (the persister isolates the entry and dead-letters it).

Anything else (a syntax error, a wrong type) is our bug: it propagates unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from engine.errors import DatabaseUnavailable

# Exception classes that mean "no usable connection" (an OSError covers refused and
# reset connections, a TimeoutError is one).
DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # A connection whose protocol state broke (seen when PostgreSQL ended the session
    # between two statements: "cannot switch to state 15"): unusable, not our data's fault.
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
# A connection that raised one of these is closed rather than handed back to the pool.
BROKEN_CONNECTION: tuple[type[BaseException], ...] = (
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# SQLSTATE classes meaning "PostgreSQL cannot serve this now, try later": 08 connection
# exception, 53 insufficient resources (disk full, out of memory), 57 operator
# intervention (statement timeout or cancel 57014, admin shutdown 57P01, cannot connect
# now 57P03), 58 system error (I/O).
DOWN_SQLSTATE_CLASSES = ("08", "53", "57", "58")
# A read-only transaction: a standby after a failover, or default_transaction_read_only.
READ_ONLY_SQLSTATE = "25006"
# The schema is not there (deployed before `flashsale migrate` ran): a table, or a column
# a later migration adds (deals.archived_at, 0002).
NOT_MIGRATED_SQLSTATES = ("42P01", "42703")
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.LockNotAvailableError,
)
# SQLSTATE classes meaning "this data cannot be stored": 21 cardinality, 22 data
# exception, 23 integrity constraint, 54 program limit (e.g. a value too large to index).
REFUSED_SQLSTATE_CLASSES = ("21", "22", "23", "54")

NOT_MIGRATED = "The database has not been migrated yet."


class Transient(Exception):
    """Two transactions clashed (deadlock, serialization failure): retry at once."""


class Refused(Exception):
    """PostgreSQL refused the data itself: retrying the same rows will not help."""


def _sqlstate(exc: BaseException) -> str:
    if not isinstance(exc, asyncpg.PostgresError):
        return ""
    return getattr(exc, "sqlstate", None) or ""


def is_down(exc: BaseException) -> bool:
    """PostgreSQL cannot serve now (and may later): the one definition of "down"."""
    if isinstance(exc, DOWN):
        return True
    state = _sqlstate(exc)
    return state[:2] in DOWN_SQLSTATE_CLASSES or state == READ_ONLY_SQLSTATE


def is_refused(exc: BaseException) -> bool:
    """PostgreSQL refused the data itself."""
    return _sqlstate(exc)[:2] in REFUSED_SQLSTATE_CLASSES


@asynccontextmanager
async def translated() -> AsyncIterator[None]:
    """Translate asyncpg failures inside the block (see the module docstring)."""
    try:
        yield
    except TRANSIENT as exc:
        raise Transient(str(exc)) from exc
    except DOWN as exc:
        raise DatabaseUnavailable() from exc
    except asyncpg.PostgresError as exc:
        if is_down(exc):
            raise DatabaseUnavailable() from exc
        if _sqlstate(exc) in NOT_MIGRATED_SQLSTATES:
            raise DatabaseUnavailable(NOT_MIGRATED) from exc
        if is_refused(exc):
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        raise
