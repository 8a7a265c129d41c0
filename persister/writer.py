"""Writing a batch of stream entries to PostgreSQL: one transaction, one statement per table.

Used by the worker (then XACK) and by ``replay`` (no ack). A batch that PostgreSQL
refuses is retried entry by entry inside savepoints, so one poisoned entry goes to the
dead letters while the rest of its batch lands in the same transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from database.errors import Refused, translated
from database.pool import Database
from persister import queries
from persister.events import Entry, Parsed, Rows, parse

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Written:
    """What one write did."""

    entries: int = 0
    vouchers: int = 0  # voucher rows in the batch (some may be there already)
    vouchers_new: int = 0
    parked: list[dict[str, Any]] = field(default_factory=list)
    dead: list[tuple[Entry, str]] = field(default_factory=list)

    def merge(self, other: Written) -> None:
        self.entries += other.entries
        self.vouchers += other.vouchers
        self.vouchers_new += other.vouchers_new
        self.parked.extend(other.parked)
        self.dead.extend(other.dead)


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(width)]


async def write_rows(conn: Any, rows: Rows) -> Written:
    """Write parsed rows (inside the caller's transaction); park Redis time travellers."""
    out = Written(vouchers=len(rows.vouchers))
    if rows.deals:
        await conn.execute(queries.INSERT_DEALS, *_columns(list(rows.deals.values()), 11))
    if rows.cancels:
        await conn.execute(
            queries.UPSERT_CANCELS, list(rows.cancels.keys()), list(rows.cancels.values())
        )
    if rows.vouchers:
        deal, seq, voucher, user, at, stream, entry_id = _columns(rows.vouchers, 7)
        inserted = await conn.fetchval(queries.INSERT_VOUCHERS, voucher, deal, seq, user, at)
        out.vouchers_new = int(inserted)
        if inserted < len(rows.vouchers):
            # Redelivered entries are already there; anything else clashed on a key.
            parked = await conn.fetch(
                queries.PARK_VOUCHERS, voucher, deal, seq, user, at, stream, entry_id
            )
            for r in parked:
                log.error(
                    "PARKED voucher %s (deal %s seq %s user %s): the seq is held by %s, "
                    "the user by %s. Redis went back in time (failover or restore); "
                    "see the parked_vouchers table",
                    r["voucher_id"],
                    r["deal_id"],
                    r["seq"],
                    r["user_id"],
                    r["clash_seq_voucher"],
                    r["clash_user_voucher"],
                )
                out.parked.append(dict(r))
    if rows.redeems:
        cols = _columns(rows.redeems, 6)
        await conn.execute(queries.INSERT_REDEMPTIONS, *cols)
        await conn.execute(queries.REDEMPTIONS_TO_CONFLICTS, *cols)
    if rows.conflicts:
        await conn.execute(queries.INSERT_CONFLICTS, *_columns(rows.conflicts, 7))
    return out


async def write_dead_letters(conn: Any, dead: list[tuple[Entry, str]], attempts: int) -> None:
    """Record entries that will not be written (inside the caller's transaction)."""
    if not dead:
        return
    for entry, error in dead:
        log.error("dead letter %s %s: %s", entry.stream, entry.id, error)
    await conn.execute(
        queries.INSERT_DEAD_LETTERS,
        [e.stream for e, _ in dead],
        [e.id for e, _ in dead],
        [_evidence(e.fields) for e, _ in dead],
        [err[:2000] for _, err in dead],
        [attempts] * len(dead),
    )


def _evidence(fields: dict[str, str]) -> str:
    """The entry's fields as JSON that jsonb accepts (it refuses NUL, shown as U+2400)."""
    clean = {
        str(k).replace("\0", "\u2400"): str(v).replace("\0", "\u2400") for k, v in fields.items()
    }
    return orjson.dumps(clean).decode()


async def write_entries(db: Database, entries: list[Entry], max_attempts: int) -> Written:
    """Write entries in one transaction; a refused batch is retried entry by entry.

    Raises ``DatabaseUnavailable`` (nothing written) or ``Transient`` (retry).
    """
    return await write_parsed(db, parse(entries), max_attempts)


async def write_parsed(db: Database, parsed: Parsed, max_attempts: int) -> Written:
    """``write_entries`` on entries already parsed (a retry does not parse again)."""
    rows, good, bad = parsed
    async with db.transaction() as conn:
        try:
            async with translated(), conn.transaction():  # a savepoint
                out = await write_rows(conn, rows)
        except Refused as exc:
            log.warning("batch of %d refused (%s): isolating entries", len(good), exc)
            out = await _isolate(conn, good, max_attempts)
        out.entries = len(good) + len(bad)
        out.dead.extend(bad)
        await write_dead_letters(conn, bad, 1)
    return out


async def _isolate(conn: Any, entries: list[Entry], max_attempts: int) -> Written:
    """Write each entry in its own savepoint; dead-letter those refused ``max_attempts`` times."""
    out = Written()
    refused: list[tuple[Entry, str]] = []
    for entry in entries:
        rows, _, _ = parse([entry])
        error = ""
        for _attempt in range(max_attempts):
            try:
                async with translated(), conn.transaction():
                    out.merge(await write_rows(conn, rows))
                break
            except Refused as exc:
                error = str(exc)
        else:
            refused.append((entry, error))
    await write_dead_letters(conn, refused, max_attempts)
    out.dead.extend(refused)
    return out
