"""Deals: create, read, cancel, and the live status rule."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from engine import claims
from engine.deals import DealHash, cancel_deal, create_deal, deal_status, get_deal
from engine.errors import DealNotFound, Forbidden
from engine.store import Store
from engine.times import to_rfc3339
from tests.helpers import lua_source, new_deal


async def test_created_deal_reads_back_with_every_field(store: Store) -> None:
    spec = new_deal(7, merchant_id="m-5", title="Café ☕ – ½ price")
    deal = await create_deal(store, spec)
    got = await get_deal(store, deal.id)
    j = got.to_json()
    assert j["merchant_id"] == "m-5"
    assert j["title"] == "Café ☕ – ½ price"
    assert (j["lat"], j["lng"]) == (spec.lat, spec.lng)
    assert (j["inventory_total"], j["inventory_left"]) == (7, 7)
    assert j["starts_at"] == to_rfc3339(spec.starts_at_ms)
    assert j["redeem_until"].endswith("Z")
    assert j["status"] == "active"


async def test_unknown_deal_is_not_found(store: Store) -> None:
    with pytest.raises(DealNotFound):
        await get_deal(store, "d_0000000000000000")


async def test_scheduled_deal_reads_scheduled(store: Store) -> None:
    deal = await create_deal(store, new_deal(starts_in_ms=600_000))
    assert (await get_deal(store, deal.id)).status == "scheduled"


async def test_only_the_owner_cancels_and_cancel_is_idempotent(store: Store) -> None:
    """Another merchant gets Forbidden; the owner's second cancel keeps the first time."""
    deal = await create_deal(store, new_deal(merchant_id="m-1"))
    with pytest.raises(Forbidden):
        await cancel_deal(store, deal.id, "m-2")
    assert (await get_deal(store, deal.id)).status == "active"
    first = await cancel_deal(store, deal.id, "m-1")
    second = await cancel_deal(store, deal.id, "m-1")
    assert first.status == second.status == "cancelled"
    assert first.cancelled_at_ms == second.cancelled_at_ms is not None


async def test_cancel_of_unknown_deal_is_not_found(store: Store) -> None:
    with pytest.raises(DealNotFound):
        await cancel_deal(store, "d_missing", "m-1")


async def test_deal_and_its_partition_stream_share_a_hash_slot(store: Store) -> None:
    """Every key one script touches hashes to one slot (so scripts run on a cluster)."""
    from redis.crc import key_slot

    for i in range(50):
        k = store.keys.for_deal(f"d_{i:016x}")
        slots = {
            key_slot(x.encode())
            for x in (k.deal, k.claimers, k.vouchers, k.events, k.geo, k.redemptions)
        }
        assert len(slots) == 1


async def test_sold_out_deal_leaves_the_geo_index(store: Store) -> None:
    deal = await create_deal(store, new_deal(1))
    k = store.keys.for_deal(deal.id)
    assert await store.client.zscore(k.geo, deal.id) is not None
    await claims.claim(store, deal.id, "u-1")
    assert await store.client.zscore(k.geo, deal.id) is None


async def test_cancelled_deal_leaves_the_geo_index(store: Store) -> None:
    deal = await create_deal(store, new_deal(3))
    k = store.keys.for_deal(deal.id)
    await cancel_deal(store, deal.id, "m-1")
    assert await store.client.zscore(k.geo, deal.id) is None


@pytest.mark.parametrize(
    ("now", "left", "cancelled", "expected"),
    [
        (50, 1, True, "cancelled"),
        (200, 0, False, "ended"),
        (200, 5, False, "ended"),
        (10, 5, False, "scheduled"),
        (10, 0, False, "scheduled"),
        (50, 0, False, "sold_out"),
        (50, 5, False, "active"),
        (100, 5, False, "active"),
    ],
)
def test_status_is_cancelled_then_ended_then_scheduled_then_sold_out_then_active(
    now: int, left: int, cancelled: bool, expected: str
) -> None:
    """cancelled > ended > scheduled > sold_out > active; starts inclusive, ends exclusive."""
    assert deal_status(now, 50, 200, left, cancelled) == expected


# A hash command in a script: redis.call('HSET', KEYS[1], 'left', ...).
_HASH_CALL = re.compile(r"redis\.call\('(H[A-Z]+)',\s*(KEYS\[\d+\]|key)\s*,([^)]*)\)")


def _deal_hash_calls(script: str) -> list[tuple[str, list[str]]]:
    """``(command, field names)`` of each hash command a script runs on its deal hash.

    The deal hash is the key its header names ``deal hash`` (``read_deals`` loops over
    ``KEYS[i]`` as ``key``); field names are the quoted literals among the arguments.
    """
    source = lua_source(script)
    named = re.findall(r"^-- (KEYS\[(?:\d+|i)\])\s+deal hash\b", source, re.MULTILINE)
    deal_keys = {"key" if k == "KEYS[i]" else k for k in named}
    return [
        (command, re.findall(r"'([^']*)'", args))
        for command, key, args in _HASH_CALL.findall(source)
        if key in deal_keys
    ]


def test_every_lua_script_names_the_deal_hash_fields_of_deal_hash() -> None:
    """The Lua scripts use DealHash's field names, and read_deals returns them in its order."""
    scripts = sorted(
        p.name[:-4] for p in resources.files("lua").iterdir() if p.name.endswith(".lua")
    )
    calls = {s: _deal_hash_calls(s) for s in scripts}
    touching = {s for s, c in calls.items() if c}
    assert touching >= {"create_deal", "read_deals", "claim_voucher", "cancel_deal"}
    for script, script_calls in calls.items():
        for command, fields in script_calls:
            assert set(fields) <= set(DealHash.ALL), (script, command, fields)
    (create,) = [f for c, f in calls["create_deal"] if c == "HSET"]
    assert sorted(create) == sorted(set(DealHash.ALL) - {DealHash.CANCELLED})
    reads = [f for c, f in calls["read_deals"] if c == "HMGET"]
    assert reads == [[*DealHash.LIVE, *DealHash.FIXED], list(DealHash.LIVE)]
