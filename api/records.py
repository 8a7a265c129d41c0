"""The API's read side in PostgreSQL: its queries, over the shared lazily connecting pool.

The pool connects lazily, so the API starts, and claims go on, while PostgreSQL is down;
``/readyz`` says so. Every asyncpg failure is translated by ``database.errors``, the
definition of "PostgreSQL is down" that the persister uses too.
"""

from __future__ import annotations

from typing import Any

from database.pool import Database

# A request waits at most this long for a connection (twice that in all): the API answers
# 503 quickly rather than queueing requests behind a PostgreSQL that is away.
CONNECT_TIMEOUT_S = 2.0
# One query at most: the API's reads are small and indexed.
COMMAND_TIMEOUT_S = 5.0
POOL_MAX_SIZE = 10


class Records(Database):
    """The API's PostgreSQL queries, on a small pool of its own."""

    def __init__(self, dsn: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        super().__init__(
            dsn, max_size=POOL_MAX_SIZE, timeout_s=timeout_s, command_timeout_s=COMMAND_TIMEOUT_S
        )

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
            if not await conn.fetchval("SELECT to_regclass('dead_letters') IS NOT NULL"):
                return None
            return int(await conn.fetchval("SELECT count(*) FROM dead_letters"))


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
