"""Stream entry ids and the persister group's lag (engine/streams.py)."""

from __future__ import annotations

from engine import claims
from engine.deals import create_deal
from engine.keys import STREAM_GROUP
from engine.store import Store
from engine.streams import format_id, next_id, parse_id, stream_lag
from tests.helpers import new_deal


def test_entry_ids_parse_format_and_step() -> None:
    """``ms-seq`` ids order as (ms, seq) pairs; a bare ms is seq 0; next_id steps seq."""
    assert parse_id("1700000000000-7") == (1_700_000_000_000, 7)
    assert parse_id("5") == (5, 0)
    assert format_id(*parse_id("12-3")) == "12-3"
    assert next_id("12-3") == "12-4"
    assert sorted(["10-1", "9-20", "10-0"], key=parse_id) == ["9-20", "10-0", "10-1"]


async def test_lag_counts_entries_the_group_has_not_acknowledged(store: Store) -> None:
    """Before the group: every entry; then undelivered plus pending; acked: zero."""
    assert await stream_lag(store) == 0  # no stream at all yet
    deal = await create_deal(store, new_deal(5))
    for i in range(3):
        await claims.claim(store, deal.id, f"u-{i}")
    key = store.keys.for_deal(deal.id).events
    assert await stream_lag(store) == 4
    for stream in store.keys.all_events():
        await store.create_group(stream, STREAM_GROUP)
    assert await stream_lag(store) == 4
    read = await store.read_group(STREAM_GROUP, "c", {key: ">"}, count=2)
    assert await stream_lag(store) == 4  # two delivered, still pending
    pipe = store.pipeline()
    pipe.ack(key, STREAM_GROUP, [entry_id for _, entry_id, _ in read])
    await pipe.execute()
    assert await stream_lag(store) == 2
