"""The partition streams as the persister's consumer group sees them.

Reading, acknowledging, reclaiming and trimming, with redis errors translated by the
store's guard; a missing group (Redis flushed or restored) is recreated, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import redis.exceptions as rexc

from engine.keys import STREAM_GROUP, consumer_lease_key
from engine.store import Store

log = logging.getLogger(__name__)

# (stream, entry id, fields); fields is None for an entry deleted while pending.
RawEntry = tuple[str, str, dict[str, str] | None]


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def format_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def next_id(entry_id: str) -> str:
    ms, seq = parse_id(entry_id)
    return format_id(ms, seq + 1)


async def stream_lag(store: Store) -> int:
    """Entries not yet acknowledged by the persister's group, summed over partitions.

    ``lag`` (entries never delivered) plus ``pending`` (delivered, not acked); before the
    group exists every entry counts.
    """
    async with store.guard():
        lags = await asyncio.gather(*(_partition_lag(store, k) for k in store.keys.all_events()))
        return sum(lags)


async def _partition_lag(store: Store, key: str) -> int:
    try:
        groups: list[dict[str, Any]] = await store.client.xinfo_groups(key)
    except rexc.ResponseError:  # no such stream yet
        return 0
    for g in groups:
        if g.get("name") == STREAM_GROUP:
            pending = int(g.get("pending", 0))
            lag = g.get("lag")
            if lag is None:
                # Unknown (the group was made on a stream with a trimmed history):
                # count what lies after the group's last delivered entry.
                last = str(g.get("last-delivered-id", "0-0"))
                after = await store.client.xrange(key, min=f"({last}", max="+", count=100_000)
                lag = len(after)
            return int(lag) + pending
    return int(await store.client.xlen(key))


async def ensure_groups(store: Store) -> None:
    """Create the persister's group on every partition stream (from the start: id 0)."""
    async with store.guard():
        for key in store.keys.all_events():
            try:
                await store.client.xgroup_create(key, STREAM_GROUP, id="0", mkstream=True)
            except rexc.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise


def _flatten(reply: Any) -> list[RawEntry]:
    out: list[RawEntry] = []
    if not reply:
        return out
    items = reply.items() if isinstance(reply, dict) else reply
    for stream, entries in items:
        if isinstance(entries, list) and len(entries) == 1 and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 shape
        for entry_id, fields in entries:
            out.append((str(stream), str(entry_id), fields or None))
    return out


class Consumer:
    """One member of the persister's consumer group, reading every partition stream."""

    def __init__(self, store: Store, name: str, count: int, block_ms: int) -> None:
        self.store = store
        self.name = name
        self.count = count
        self.block_ms = block_ms
        self.keys = store.keys.all_events()
        self._reclaim_from = dict.fromkeys(self.keys, "-")

    async def _call(self, coro: Any) -> Any:
        """Run one group command; a missing group (Redis lost its data) is recreated."""
        try:
            async with self.store.guard():
                return await coro
        except rexc.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
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
        client = self.store.client
        if not self.store.settings.redis_cluster:
            reply = await self._call(
                client.xreadgroup(
                    STREAM_GROUP,
                    self.name,
                    dict.fromkeys(self.keys, start),
                    count=self.count,
                    block=block_ms,
                )
            )
            return _flatten(reply)
        # A cluster cannot read streams of several slots in one call.
        replies = await asyncio.gather(
            *(
                self._call(client.xreadgroup(STREAM_GROUP, self.name, {k: start}, count=self.count))
                for k in self.keys
            )
        )
        out = [e for r in replies for e in _flatten(r)]
        if not out and block_ms:
            await asyncio.sleep(block_ms / 1000)
        return out

    async def ack(self, entries: list[RawEntry]) -> None:
        """Acknowledge entries (after their commit), one pipeline for all streams."""
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _ in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        async with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, STREAM_GROUP, *ids)
            await pipe.execute()

    async def touch(self, entries: list[RawEntry]) -> None:
        """Reset the idle time of entries this consumer holds, counting no delivery.

        ``XCLAIM ... JUSTID`` to ourselves: while a batch waits for PostgreSQL, other
        consumers' reclaims leave it alone instead of raising its delivery count.
        """
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _ in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        async with self.store.guard():
            pipe = self.store.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xclaim(stream, STREAM_GROUP, self.name, 0, ids, justid=True)
            await pipe.execute()

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
                rows = await self._call(
                    self.store.client.xpending_range(
                        key, STREAM_GROUP, start, "+", self.count, idle=min_idle_ms
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
            claimed = await self._call(
                self.store.client.xclaim(key, STREAM_GROUP, self.name, min_idle_ms, ids)
            )
            out.extend((key, str(eid), fields or None) for eid, fields in claimed or [])
        return out

    async def delivery_counts(self, entries: list[RawEntry]) -> dict[tuple[str, str], int]:
        """How often each of this consumer's pending entries has been delivered."""
        counts: dict[tuple[str, str], int] = {}
        by_stream: dict[str, list[str]] = {}
        for stream, entry_id, _ in entries:
            by_stream.setdefault(stream, []).append(entry_id)
        for stream, ids in by_stream.items():
            ids.sort(key=parse_id)
            rows = await self._call(
                self.store.client.xpending_range(
                    stream, STREAM_GROUP, ids[0], ids[-1], len(ids) + 1000, self.name
                )
            )
            for row in rows or []:
                counts[(stream, str(row["message_id"]))] = int(row["times_delivered"])
        return counts


@dataclass(frozen=True, slots=True)
class Trimmed:
    stream: str
    removed: int
    length: int


async def trim_acked(store: Store, retention_ms: int, cap_fraction: float) -> list[Trimmed]:
    """Trim each stream below what every group has acknowledged and past the retention.

    A stream longer than ``cap_fraction`` of the stream cap is trimmed down to what was
    acknowledged even inside the retention: claims must not be refused (backlog_full)
    only to keep replay history.
    """
    out: list[Trimmed] = []
    async with store.guard():
        sec, usec = await store.client.time()
        retention_floor = format_id(int(sec) * 1000 + int(usec) // 1000 - retention_ms, 0)
        near_cap = int(store.settings.stream_cap * cap_fraction)
        for key in store.keys.all_events():
            try:
                groups = await store.client.xinfo_groups(key)
            except rexc.ResponseError:
                continue
            if not groups:
                continue  # nobody has read anything: nothing is acknowledged
            acked_floor: tuple[int, int] | None = None
            for g in groups:
                floor = next_id(str(g["last-delivered-id"]))
                if int(g.get("pending", 0)):
                    summary = await store.client.xpending(key, g["name"])
                    floor = str(summary["min"])
                acked_floor = min(acked_floor or parse_id(floor), parse_id(floor))
            assert acked_floor is not None
            length = int(await store.client.xlen(key))
            floor_id = format_id(*acked_floor)
            if length < near_cap:
                floor_id = format_id(*min(acked_floor, parse_id(retention_floor)))
            removed = int(await store.client.xtrim(key, minid=floor_id, approximate=False))
            if removed:
                out.append(Trimmed(key, removed, length - removed))
    return out


class NameTaken(Exception):
    """Every consumer slot on this host is leased by a live process."""


async def lease_consumer_name(store: Store, ttl_ms: int, slots: int = 64) -> tuple[str, str]:
    """Lease a free, stable name ``<host>-<n>`` (lowest free n); return (name, token)."""
    host = socket.gethostname().split(".")[0] or "persister"
    token = f"{os.getpid()}-{os.urandom(4).hex()}"
    async with store.guard():
        for n in range(slots):
            name = f"{host}-{n}"
            if await store.client.set(consumer_lease_key(name), token, nx=True, px=ttl_ms):
                return name, token
    raise NameTaken(f"all {slots} persister names on {host} are in use")


# Compare-and-set on a lease, atomic in Redis: a GET then a SET from the client could
# overwrite a lease another process took in between (after ours expired). Run with EVAL
# (a script this small is not worth a place in the store's registry).
_RENEW_LEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not held then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


async def renew_lease(store: Store, name: str, token: str, ttl_ms: int) -> bool:
    """Extend our lease (or take it back if it lapsed and nobody took it); False if
    another process holds the name now. Atomic: never overwrites another's lease."""
    async with store.guard():
        held = await store.client.eval(
            _RENEW_LEASE, 1, consumer_lease_key(name), token, str(ttl_ms)
        )
        return bool(int(held))


async def release_lease(store: Store, name: str, token: str) -> None:
    """Drop our lease, only if it is still ours (atomic, like ``renew_lease``)."""
    async with store.guard():
        await store.client.eval(_RELEASE_LEASE, 1, consumer_lease_key(name), token)


async def unacknowledged(
    store: Store, key: str, page: int = 5000
) -> list[tuple[str, dict[str, str]]]:
    """Entries of one stream the persister's group has not acknowledged (maybe a few more)."""
    async with store.guard():
        try:
            groups = await store.client.xinfo_groups(key)
        except rexc.ResponseError:  # no such stream
            return []
        start = "-"
        for g in groups:
            if g["name"] != STREAM_GROUP:
                continue
            start = next_id(str(g["last-delivered-id"]))
            if int(g.get("pending", 0)):
                summary = await store.client.xpending(key, STREAM_GROUP)
                start = min(start, str(summary["min"]), key=parse_id)
        out: list[tuple[str, dict[str, str]]] = []
        while True:
            chunk = await store.client.xrange(key, min=start, max="+", count=page)
            out.extend((str(i), f) for i, f in chunk if f)
            if len(chunk) < page:
                return out
            start = f"({chunk[-1][0]}"
