"""The API's read side in PostgreSQL (asyncpg); its exceptions are translated here.

The pool connects lazily (``min_size=0``) so the API starts, and claims go on, while
PostgreSQL is down; ``/readyz`` says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from engine.errors import DatabaseUnavailable

_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

# SQLSTATE classes that mean "PostgreSQL cannot serve now": connection (08), resources
# such as a full disk (53), operator intervention or a statement timeout (57), system
# I/O (58); and 25006, a read-only standby after a failover.
_DOWN_CLASSES = ("08", "53", "57", "58")


def _is_down(exc: BaseException) -> bool:
    if isinstance(exc, _DOWN):
        return True
    state = getattr(exc, "sqlstate", None) or ""
    return isinstance(exc, asyncpg.PostgresError) and (
        state[:2] in _DOWN_CLASSES or state == "25006"
    )


class Records:
    """A small pool for the API's PostgreSQL queries."""

    def __init__(self, dsn: str, timeout_s: float = 2.0) -> None:
        self.dsn = dsn
        self.timeout_s = timeout_s
        self._pool: Any = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=10, timeout=self.timeout_s, command_timeout=5
        )

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; PostgreSQL being away becomes ``DatabaseUnavailable``."""
        try:
            async with asyncio.timeout(self.timeout_s * 3):
                async with self._pool.acquire(timeout=self.timeout_s) as conn:
                    yield conn
        except asyncpg.UndefinedTableError as exc:
            # Deployed before `flashsale migrate` ran: not ready, not our bug per request.
            raise DatabaseUnavailable("The database has not been migrated yet.") from exc
        except Exception as exc:
            if _is_down(exc):
                raise DatabaseUnavailable() from exc
            raise

    async def ping(self) -> bool:
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except DatabaseUnavailable:
            return False

    async def user_vouchers(
        self, user_id: str, limit: int, before: tuple[int, str] | None
    ) -> list[Any]:
        """A user's vouchers, newest first, strictly before ``(claimed_at_ms, id)``."""
        async with self.connection() as conn:
            if before is None:
                return list(await conn.fetch(_USER_VOUCHERS, user_id, limit))
            return list(await conn.fetch(_USER_VOUCHERS_BEFORE, user_id, limit, *before))

    async def dead_letter_count(self) -> int | None:
        """Rows in the persister's dead-letter table (None before the migrations ran)."""
        async with self.connection() as conn:
            try:
                return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))
            except asyncpg.UndefinedTableError:
                return None


_USER_VOUCHERS_COLUMNS = """
SELECT v.id, v.deal_id, v.user_id, v.seq, fs_to_ms(v.claimed_at) AS claimed_ms,
       d.merchant_id, fs_to_ms(d.redeem_until) AS redeem_until_ms,
       r.voucher_id IS NOT NULL AS redeemed
FROM vouchers v
JOIN deals d ON d.id = v.deal_id AND d.merchant_id IS NOT NULL
LEFT JOIN redemptions r ON r.voucher_id = v.id
WHERE v.user_id = $1
"""
_USER_VOUCHERS = (
    _USER_VOUCHERS_COLUMNS
    + """
ORDER BY v.claimed_at DESC, v.id DESC
LIMIT $2
"""
)
_USER_VOUCHERS_BEFORE = (
    _USER_VOUCHERS_COLUMNS
    + """
  AND (v.claimed_at, v.id) < (fs_ms($3), $4)
ORDER BY v.claimed_at DESC, v.id DESC
LIMIT $2
"""
)
