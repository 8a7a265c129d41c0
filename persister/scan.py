"""The deal hashes Redis holds, found by SCAN (shared by ``reconcile`` and ``rebuild-redis``)."""

from __future__ import annotations

from engine.store import Store


async def deal_ids(store: Store, limit: int | None = None) -> list[str]:
    """Ids of the deals Redis holds (at most ``limit`` of them, if given), unordered."""
    keys = await store.scan_keys(store.keys.deal_pattern(), limit=limit)
    return [key.rsplit(":deal:", 1)[1] for key in keys]
