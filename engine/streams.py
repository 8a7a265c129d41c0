"""The partition streams as the engine sees them: entry ids, and how far behind the
persister's consumer group is (readiness, metrics, ``reconcile``).

The persister's side (its consumer, trimming, consumer-name leases) lives in
``persister/``; the Redis commands in ``engine/store.py``.
"""

from __future__ import annotations

import asyncio

from engine.keys import STREAM_GROUP
from engine.store import Store


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
    lags = await asyncio.gather(*(_partition_lag(store, k) for k in store.keys.all_events()))
    return sum(lags)


async def _partition_lag(store: Store, key: str) -> int:
    for g in await store.stream_groups(key):
        if g.get("name") == STREAM_GROUP:
            pending = int(g.get("pending", 0))
            lag = g.get("lag")
            if lag is None:
                # Unknown (the group was made on a stream with a trimmed history):
                # count what lies after the group's last delivered entry.
                last = str(g.get("last-delivered-id", "0-0"))
                lag = len(await store.stream_range(key, f"({last}", count=100_000))
            return int(lag) + pending
    return await store.stream_length(key)
