"""The deal hashes Redis holds, found by SCAN (shared by ``reconcile`` and ``rebuild-redis``)."""

from __future__ import annotations

from engine.store import Store


async def deal_ids(store: Store, limit: int | None = None) -> list[str]:
    """Ids of the deals Redis holds (at most ``limit`` of them, if given), unordered."""
    ids: list[str] = []
    async with store.guard():
        async for key in store.client.scan_iter(match=store.keys.deal_pattern(), count=1000):
            ids.append(str(key).rsplit(":deal:", 1)[1])
            if limit is not None and len(ids) >= limit:
                break
    return ids
