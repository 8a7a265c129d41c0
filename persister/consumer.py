"""The persister's consumer group on the partition streams, and one member of it.

Creating the group, reading (own pending entries, new ones), acknowledging, keeping a
held batch fresh, reclaiming other members' idle entries, and what the group has not
acknowledged yet. A missing group (Redis flushed or restored) is recreated, not an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from engine.errors import StoreUnavailable, StreamGroupMissing
from engine.keys import STREAM_GROUP
from engine.store import RawEntry, Store
from engine.streams import next_id, parse_id

log = logging.getLogger(__name__)

T = TypeVar("T")


async def ensure_groups(store: Store) -> None:
    """Create the persister's group on every partition stream (from the start: id 0)."""
    for key in store.keys.all_events():
        await store.create_group(key, STREAM_GROUP)


async def ack_floor(store: Store, key: str, group: dict[str, Any]) -> str:
    """The lowest entry id ``group`` (a ``stream_groups`` row) has not acknowledged:
    its oldest pending entry, else the one after its last delivered."""
    floor = next_id(str(group["last-delivered-id"]))
    if int(group.get("pending", 0)):
        summary = await store.pending_summary(key, str(group["name"]))
        # None: another persister acknowledged them since ``group`` was read; every entry
        # delivered by then is acknowledged, and later ones lie past ``floor``.
        if summary["min"] is not None:
            floor = min(floor, str(summary["min"]), key=parse_id)
    return floor


async def unacknowledged(
    store: Store, key: str, page: int = 5000
) -> list[tuple[str, dict[str, str]]]:
    """Entries of one stream the persister's group has not acknowledged (maybe a few more)."""
    start = "-"
    for g in await store.stream_groups(key):
        if g["name"] == STREAM_GROUP:
            start = await ack_floor(store, key, g)
    out: list[tuple[str, dict[str, str]]] = []
    while True:
        chunk = await store.stream_range(key, start, count=page)
        out.extend((i, f) for i, f in chunk if f)
        if len(chunk) < page:
            return out
        start = f"({chunk[-1][0]}"


def _by_stream(entries: Iterable[RawEntry]) -> dict[str, list[str]]:
    by_stream: dict[str, list[str]] = {}
    for stream, entry_id, _ in entries:
        by_stream.setdefault(stream, []).append(entry_id)
    return by_stream


class Consumer:
    """One member of the persister's consumer group, reading every partition stream."""

    def __init__(self, store: Store, name: str, count: int, block_ms: int) -> None:
        self.store = store
        self.name = name
        self.count = count
        self.block_ms = block_ms
        self.keys = store.keys.all_events()
        self._reclaim_from = dict.fromkeys(self.keys, "-")

    async def _recover(self, call: Awaitable[T]) -> T | None:
        """Await one group command; a missing group (Redis lost its data) is recreated
        and the command answers None."""
        try:
            return await call
        except StreamGroupMissing:
            log.warning("consumer group missing (Redis flushed or restored?): recreating it")
            await ensure_groups(self.store)
            return None

    async def read_own_pending(self) -> list[RawEntry]:
        """Entries delivered to this consumer and never acknowledged (a previous run's)."""
        return await self._read("0", block_ms=None)

    async def read_new(self) -> list[RawEntry]:
        """New entries, waiting up to ``block_ms`` if there are none."""
        return await self._read(">", block_ms=self.block_ms)

    async def _read(self, start: str, block_ms: int | None) -> list[RawEntry]:
        store = self.store
        if not store.settings.redis_cluster:
            read = store.read_group(
                STREAM_GROUP,
                self.name,
                dict.fromkeys(self.keys, start),
                count=self.count,
                block_ms=block_ms,
            )
            return await self._recover(read) or []
        # A cluster cannot read streams of several slots in one call.
        replies = await asyncio.gather(
            *(
                self._recover(
                    store.read_group(STREAM_GROUP, self.name, {k: start}, count=self.count)
                )
                for k in self.keys
            )
        )
        out = [e for r in replies for e in r or []]
        if not out and block_ms:
            await asyncio.sleep(block_ms / 1000)
        return out

    async def ack(self, entries: list[RawEntry]) -> None:
        """Acknowledge entries (after their commit), one pipeline for all streams."""
        pipe = self.store.pipeline()
        for stream, ids in _by_stream(entries).items():
            pipe.ack(stream, STREAM_GROUP, ids)
        await pipe.execute()

    async def touch(self, entries: list[RawEntry]) -> None:
        """Reset the idle time of entries this consumer holds, counting no delivery.

        ``XCLAIM ... JUSTID`` to ourselves: while a batch waits for PostgreSQL, other
        consumers' reclaims leave it alone instead of raising its delivery count.
        """
        pipe = self.store.pipeline()
        for stream, ids in _by_stream(entries).items():
            pipe.touch(stream, STREAM_GROUP, self.name, ids)
        await self._recover(pipe.execute())

    async def reclaim(self, min_idle_ms: int) -> list[RawEntry]:
        """Take over entries *other* consumers left pending too long (XPENDING + XCLAIM).

        Never this consumer's own: those are in hand (being written, maybe retried for as
        long as PostgreSQL is away, or read ahead), and claiming them again would only
        raise their delivery counts until valid entries were dead-lettered as "delivered
        too often" after a few long stalls. (XAUTOCLAIM cannot leave a consumer out.)
        XCLAIM re-checks the idle time, so an entry redelivered meanwhile is left alone.
        """
        out: list[RawEntry] = []
        for key in self.keys:
            ids: list[str] = []
            start = self._reclaim_from[key]
            while len(ids) < self.count:
                rows = await self._recover(
                    self.store.pending_entries(
                        key, STREAM_GROUP, start, "+", self.count, min_idle_ms=min_idle_ms
                    )
                )
                rows = rows or []
                ids += [str(r["message_id"]) for r in rows if str(r["consumer"]) != self.name]
                if len(rows) < self.count:
                    start = "-"  # the end: start over next time
                    break
                start = f"({rows[-1]['message_id']}"
            self._reclaim_from[key] = start
            if not ids:
                continue
            claimed = await self._recover(
                self.store.claim_entries(key, STREAM_GROUP, self.name, min_idle_ms, ids)
            )
            out.extend(claimed or [])
        return out

    async def delivery_counts(self, entries: list[RawEntry]) -> dict[tuple[str, str], int]:
        """How often each of this consumer's pending entries has been delivered."""
        counts: dict[tuple[str, str], int] = {}
        for stream, ids in _by_stream(entries).items():
            ids.sort(key=parse_id)
            rows = await self._recover(
                self.store.pending_entries(
                    stream, STREAM_GROUP, ids[0], ids[-1], len(ids) + 1000, consumer=self.name
                )
            )
            for row in rows or []:
                counts[(stream, str(row["message_id"]))] = int(row["times_delivered"])
        return counts

    async def pending_count(self) -> int | None:
        """Entries pending under this name over all streams (None if Redis did not say)."""
        pipe = self.store.pipeline()
        for key in self.keys:
            pipe.pending_summary(key, STREAM_GROUP)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except StoreUnavailable:
            return None
        count = 0
        for reply in replies:
            if isinstance(reply, dict):
                for c in reply.get("consumers") or []:
                    if str(c["name"]) == self.name:
                        count += int(c["pending"])
        return count
