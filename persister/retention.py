"""How long acknowledged stream entries are kept: trimming below what every group has
acknowledged, past the retention (so ``replay`` can reach recent history), or sooner
near the stream cap (so claims are not refused to keep history)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.store import Store
from engine.streams import format_id, parse_id
from persister.consumer import ack_floor


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
    retention_floor = format_id(await store.server_time_ms() - retention_ms, 0)
    near_cap = int(store.settings.stream_cap * cap_fraction)
    for key in store.keys.all_events():
        groups = await store.stream_groups(key)
        if not groups:
            continue  # nobody has read anything: nothing is acknowledged
        acked_floor = min([parse_id(await ack_floor(store, key, g)) for g in groups])
        length = await store.stream_length(key)
        floor_id = format_id(*acked_floor)
        if length < near_cap:
            floor_id = format_id(*min(acked_floor, parse_id(retention_floor)))
        removed = await store.trim_stream(key, floor_id)
        if removed:
            out.append(Trimmed(key, removed, length - removed))
    return out
