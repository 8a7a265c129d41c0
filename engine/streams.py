"""The partition streams as the persister's consumer group sees them."""

from __future__ import annotations

from typing import Any

import redis.exceptions as rexc

from engine.keys import STREAM_GROUP
from engine.store import Store


async def stream_lag(store: Store) -> int:
    """Entries not yet acknowledged by the persister's group, summed over partitions.

    ``lag`` (entries never delivered) plus ``pending`` (delivered, not acked); before the
    group exists every entry counts.
    """
    async with store.guard():
        total = 0
        for key in store.keys.all_events():
            total += await _partition_lag(store, key)
        return total


async def _partition_lag(store: Store, key: str) -> int:
    try:
        groups: list[dict[str, Any]] = await store.client.xinfo_groups(key)
    except rexc.ResponseError:  # no such stream yet
        return 0
    for g in groups:
        if g.get("name") == STREAM_GROUP:
            lag = g.get("lag")
            if lag is None:  # unknown after deletions/trims: count from XLEN instead
                lag = 0
            return int(lag) + int(g.get("pending", 0))
    return int(await store.client.xlen(key))
