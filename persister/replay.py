"""``flashsale replay``: re-apply stream entries to PostgreSQL (idempotent; acks nothing).

The streams keep acknowledged entries for ``FLASHSALE_STREAM_RETENTION``, so a row lost
or deleted in PostgreSQL can be written again from them.
"""

from __future__ import annotations

import asyncio
import logging

from database.errors import Transient
from database.pool import Database
from engine.store import Store
from persister.events import Entry
from persister.writer import Written, write_entries

log = logging.getLogger(__name__)


async def replay(
    store: Store, db: Database, from_id: str = "-", to_id: str = "+", *, batch: int = 2000
) -> Written:
    """Write every entry with ``from_id <= id <= to_id`` from each partition stream."""
    total = Written()
    for key in store.keys.all_events():
        start = from_id
        while True:
            chunk = await store.stream_range(key, start, to_id, count=batch)
            if not chunk:
                break
            entries = [Entry(key, i, f) for i, f in chunk if f]
            total.merge(await _write(db, entries, store.settings.persister_max_attempts))
            start = f"({chunk[-1][0]}"
            if len(chunk) < batch:
                break
    return total


async def _write(db: Database, entries: list[Entry], max_attempts: int) -> Written:
    for _ in range(20):
        try:
            return await write_entries(db, entries, max_attempts)
        except Transient:
            await asyncio.sleep(0.05)
    return await write_entries(db, entries, max_attempts)
