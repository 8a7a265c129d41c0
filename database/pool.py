"""A small asyncpg pool that connects lazily, used by the API and the persister.

``min_size=0``: nothing connects at start, so an API keeps taking claims and a persister
starts (and waits) while PostgreSQL is down; ``/readyz`` and the persister's log say so.
Every asyncpg failure inside ``connection()`` and ``transaction()`` is translated by
``database.errors``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from database.errors import BROKEN_CONNECTION, DOWN, translated
from engine.errors import DatabaseUnavailable

# Pool.close() waits this long for connections in use, then terminates them.
CLOSE_TIMEOUT_S = 5.0
# A connection idle this long is closed (one PostgreSQL dropped is found out on next use).
MAX_INACTIVE_S = 60.0


class Database:
    """A lazily connecting asyncpg pool with every failure translated.

    Args:
        dsn: the PostgreSQL DSN.
        max_size: connections at most.
        timeout_s: connecting, and waiting for a free connection (twice that in all).
        command_timeout_s: one statement at most (then ``DatabaseUnavailable``).
    """

    def __init__(
        self, dsn: str, *, max_size: int = 4, timeout_s: float = 5.0, command_timeout_s: float = 60
    ) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self.timeout_s = timeout_s
        self.command_timeout_s = command_timeout_s
        self._pool: Any = None

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=0,
            max_size=self.max_size,
            timeout=self.timeout_s,
            command_timeout=self.command_timeout_s,
            max_inactive_connection_lifetime=MAX_INACTIVE_S,
        )

    async def close(self) -> None:
        if self._pool is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self._pool.close()
            except DOWN:  # TimeoutError is an OSError
                self._pool.terminate()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection, with every asyncpg failure inside translated."""
        async with translated():
            async with asyncio.timeout(self.timeout_s * 2):
                conn = await self._pool.acquire(timeout=self.timeout_s)
            try:
                yield conn
            except BROKEN_CONNECTION:
                conn.terminate()  # its protocol state is unknown: the pool opens a new one
                raise
            finally:
                await self._pool.release(conn, timeout=self.timeout_s)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        """One transaction on a pooled connection (commit on exit, rollback on error)."""
        async with self.connection() as conn, translated(), conn.transaction():
            yield conn

    async def ping(self) -> bool:
        """Whether PostgreSQL answers now."""
        try:
            async with self.connection() as conn:
                return bool(await conn.fetchval("SELECT 1") == 1)
        except DatabaseUnavailable:
            return False
