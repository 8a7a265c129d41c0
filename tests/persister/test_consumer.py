"""The persister's consumer group (persister/consumer.py) against a real Redis."""

from __future__ import annotations

import asyncio

from engine import claims
from engine.deals import create_deal
from engine.keys import STREAM_GROUP
from engine.store import Store
from persister.consumer import Consumer, ack_floor, ensure_groups, unacknowledged
from tests.helpers import new_deal


async def _events(store: Store, claims_n: int) -> str:
    """A deal and ``claims_n`` claims on it (1 + claims_n entries); its stream's key."""
    deal = await create_deal(store, new_deal(claims_n))
    await asyncio.gather(*(claims.claim(store, deal.id, f"u-{i}") for i in range(claims_n)))
    return store.keys.for_deal(deal.id).events


async def _members(store: Store, claims_n: int, *names: str) -> list[Consumer]:
    """A stream of 1 + ``claims_n`` entries, the group on every stream, and its members."""
    await _events(store, claims_n)
    await ensure_groups(store)
    return [Consumer(store, name, count=100, block_ms=10) for name in names]


async def test_a_group_lost_with_redis_is_recreated_and_reading_goes_on(pstore: Store) -> None:
    """NOGROUP (Redis flushed or restored) is no error: the group comes back from id 0."""
    key = await _events(pstore, 3)
    await ensure_groups(pstore)
    c = Consumer(pstore, "c-1", count=100, block_ms=10)
    for stream in pstore.keys.all_events():
        await pstore.client.xgroup_destroy(stream, STREAM_GROUP)
    assert await c.read_new() == []
    assert all([await pstore.stream_groups(s) for s in pstore.keys.all_events()])
    again = await c.read_new()  # the recreated group starts from the first entry
    assert len(again) == 4 and {stream for stream, _, _ in again} == {key}


async def test_touch_and_ack_after_the_group_was_lost_are_no_error(pstore: Store) -> None:
    """Keeping a held batch fresh while Redis lost the group: the group comes back."""
    (c,) = await _members(pstore, 2, "c-1")
    held = await c.read_new()
    for stream in pstore.keys.all_events():
        await pstore.client.xgroup_destroy(stream, STREAM_GROUP)
    await c.touch(held)
    await c.ack(held)
    assert all([await pstore.stream_groups(s) for s in pstore.keys.all_events()])


async def test_reclaim_takes_others_idle_entries_never_its_own(pstore: Store) -> None:
    """Entries idle under another name are taken over; this name's own stay in hand."""
    a, b = await _members(pstore, 5, "a", "b")
    held = await a.read_new()
    assert len(held) == 6
    await asyncio.sleep(0.05)
    assert await a.reclaim(min_idle_ms=20) == []
    taken = await b.reclaim(min_idle_ms=20)
    assert sorted(e[1] for e in taken) == sorted(e[1] for e in held)
    assert await a.pending_count() == 0
    assert await b.pending_count() == 6
    counts = await b.delivery_counts(taken)
    assert set(counts.values()) == {2}


async def test_touch_keeps_held_entries_fresh_without_counting_a_delivery(pstore: Store) -> None:
    """A touched batch is not idle for others' reclaims, and its delivery counts stay 1."""
    a, b = await _members(pstore, 4, "a", "b")
    held = await a.read_new()
    await asyncio.sleep(0.3)
    await a.touch(held)
    assert await b.reclaim(min_idle_ms=200) == []
    assert set((await a.delivery_counts(held)).values()) == {1}
    assert await a.pending_count() == 5


async def test_read_own_pending_returns_what_this_name_never_acknowledged(pstore: Store) -> None:
    """A restart under the same name gets back its unacknowledged entries, and only them."""
    first, other = await _members(pstore, 4, "same", "other")
    held = await first.read_new()
    await first.ack(held[:2])
    restarted = Consumer(pstore, "same", count=100, block_ms=10)
    assert [e[1] for e in await restarted.read_own_pending()] == [e[1] for e in held[2:]]
    assert await other.read_own_pending() == []


async def test_unacknowledged_starts_at_the_groups_oldest_unacked_entry(pstore: Store) -> None:
    """What the group has not acknowledged: pending entries and those never delivered."""
    key = await _events(pstore, 5)
    assert len(await unacknowledged(pstore, key)) == 6  # no group yet: everything
    await ensure_groups(pstore)
    c = Consumer(pstore, "c", count=3, block_ms=10)
    held = await c.read_new()  # 3 of 6
    await c.ack(held[:2])
    left = await unacknowledged(pstore, key, page=2)
    assert [i for i, _ in left] == [i for i, _ in await pstore.stream_range(key, "-", count=10)][2:]
    await c.ack([*held, *await c.read_new()])
    assert await unacknowledged(pstore, key) == []


async def test_the_ack_floor_of_a_group_read_before_its_entries_were_acknowledged(
    pstore: Store,
) -> None:
    """Two persisters: one reads the group (4 pending), the other acknowledges them all
    before the first asks for the oldest pending one (there is none now). The floor is
    the entry after the last delivered: a bound retention may trim below, not a crash."""
    key = await _events(pstore, 3)
    await ensure_groups(pstore)
    c = Consumer(pstore, "c-1", count=100, block_ms=10)
    entries = [e for e in await c.read_new() if e[0] == key]
    assert len(entries) == 4
    (stale,) = [g for g in await pstore.stream_groups(key) if g["name"] == STREAM_GROUP]
    assert int(stale["pending"]) == 4
    await c.ack(entries)
    floor = await ack_floor(pstore, key, stale)
    last = entries[-1][1]
    ms, seq = (int(x) for x in last.split("-"))
    assert floor == f"{ms}-{seq + 1}"
