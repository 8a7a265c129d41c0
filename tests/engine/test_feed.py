"""The redemptions feed (engine/feed.py): its stored entry, its cursor, its bound."""

from __future__ import annotations

import asyncio

import pytest

from engine import claims, feed, redemptions
from engine.claims import Voucher
from engine.deals import create_deal
from engine.keys import merchant_feed_key
from engine.store import Store
from engine.times import now_ms, to_rfc3339
from engine.vouchers import VoucherSigner
from tests.helpers import new_deal


async def _vouchers(store: Store, n: int, merchant: str = "m-1", deals: int = 1) -> list[Voucher]:
    """``n`` vouchers of ``merchant``, spread over ``deals`` deals (so over partitions)."""
    made = [await create_deal(store, new_deal(n, merchant_id=merchant)) for _ in range(deals)]
    results = await asyncio.gather(
        *(claims.claim(store, made[i % deals].id, f"u-{merchant}-{i}") for i in range(n))
    )
    return [r.voucher for r in results]


async def _read_all(store: Store, merchant: str, limit: int) -> tuple[list[str], feed.Cursor]:
    cursor = feed.Cursor.start(store.keys.partitions)
    seen: list[str] = []
    while True:
        page = await feed.read_page(store, merchant, cursor, limit)
        seen += [item.voucher_id for item in page.items]
        cursor = page.next
        if len(page.items) < limit:
            return seen, cursor


async def test_the_feed_entry_is_what_redeem_voucher_lua_writes_first_acceptances_only(
    store: Store,
) -> None:
    signer = VoucherSigner(store.settings.signing_keys_dir)
    online, offline = await _vouchers(store, 2)
    await redemptions.redeem(store, signer, signer.sign(online), "m-1")
    at = now_ms()
    entry = {"entry_id": "e-1", "token": signer.sign(offline), "redeemed_at": to_rfc3339(at)}
    twin = {**entry, "entry_id": "e-2"}  # the same voucher from another entry: a conflict
    results = await redemptions.sync(store, signer, "m-1", "till-1", [entry, twin], lambda s: 1)
    assert [r["status"] for r in results] == ["accepted", "conflict"]
    await redemptions.sync(store, signer, "m-1", "till-1", [entry], lambda s: True)  # duplicate
    key = merchant_feed_key(store.keys.partition_of(offline.deal_id), "m-1")
    (_, first), (_, fields) = await store.client.xrange(key)  # one deal: one partition
    assert first["voucher"] == online.voucher_id and first["device"] == ""
    assert fields == feed.feed_fields(offline.voucher_id, at, "till-1")
    assert feed.parse_feed_entry(fields) == feed.FeedItem(offline.voucher_id, at, "till-1")
    # The stream lives as long as the last voucher it names.
    assert await store.client.pexpiretime(key) == offline.redeem_until_ms // 1000 * 1000  # exp
    page = await feed.read_page(store, "m-1", feed.Cursor.start(store.keys.partitions), 10)
    assert [i.to_json()["device_id"] for i in page.items] == [None, "till-1"]  # None: online
    assert [i.voucher_id for i in page.items] == [online.voucher_id, offline.voucher_id]
    other = await feed.read_page(store, "m-2", feed.Cursor.start(store.keys.partitions), 10)
    assert other.items == []


def test_a_cursor_round_trips_and_anything_else_is_refused() -> None:
    c = feed.Cursor((None, (1_764_007_200_000, 0), (1_764_007_100_123, 7), None))
    text = c.encode()
    assert feed.Cursor.decode(text, 4) == c and len(text) < 40
    start = feed.Cursor.start(16)
    assert feed.Cursor.decode(start.encode(), 16) == start
    raw = feed.base64url.decode(text)
    for bad in (
        "",  # (the API treats an empty `after` as absent)
        "!!",
        text + "A",  # trailing bytes, or not canonical base64url
        feed.base64url.encode(bytes([2]) + raw[1:]),  # another version
        feed.base64url.encode(raw[:-1]),  # truncated
        feed.base64url.encode(raw + b"\x00"),
        feed.base64url.encode(raw[:1] + b"\x84\x00" + raw[2:]),  # non-canonical varint
        "A" * (feed.MAX_CURSOR_CHARS + 1),
    ):
        with pytest.raises(ValueError):
            feed.Cursor.decode(bad, 4)
    with pytest.raises(ValueError):
        feed.Cursor.decode(text, 16)  # made for another partition count


@pytest.mark.parametrize("deals", [1, 12])
async def test_a_page_reads_within_its_stated_bound(store: Store, deals: int) -> None:
    """All in one partition or spread over many: at most 2P XRANGE calls in P + 1 round
    trips and 3L + P entries read per page, counted by the code and by Redis."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    vouchers = await _vouchers(store, 240, deals=deals)
    await asyncio.gather(
        *(redemptions.redeem(store, signer, signer.sign(v), "m-1") for v in vouchers)
    )
    partitions = store.keys.partitions
    for limit in (1, 7, 50, 1000):
        cursor, seen = feed.Cursor.start(partitions), []
        while True:
            before = await _xrange_calls(store)
            page = await feed.read_page(store, "m-1", cursor, limit)
            if not store.settings.redis_cluster:
                assert await _xrange_calls(store) - before == page.xrange_calls
            assert page.xrange_calls <= 2 * partitions
            assert page.round_trips <= partitions + 1
            assert page.entries_read <= 3 * limit + partitions
            seen += [i.voucher_id for i in page.items]
            cursor = page.next
            if len(page.items) < limit:
                break
        assert sorted(seen) == sorted(v.voucher_id for v in vouchers) and len(set(seen)) == 240
    # Caught up: the cursor stays, and an empty page still has one.
    page = await feed.read_page(store, "m-1", cursor, 10)
    assert page.items == [] and page.next == cursor and page.xrange_calls == partitions


async def _xrange_calls(store: Store) -> int:
    stats = await store.client.info("commandstats")
    return int(stats.get("cmdstat_xrange", {}).get("calls", 0))


async def test_pages_read_while_redemptions_are_accepted_never_skip_or_repeat(
    store: Store,
) -> None:
    """Readers page with small limits while many redeemers race over several partitions."""
    signer = VoucherSigner(store.settings.signing_keys_dir)
    vouchers = await _vouchers(store, 400, deals=10)
    tokens = [signer.sign(v) for v in vouchers]
    done = asyncio.Event()
    seen: list[str] = []

    async def redeemer(i: int) -> None:
        for token in tokens[i::20]:
            await redemptions.redeem(store, signer, token, "m-1")
            await asyncio.sleep(0)

    async def reader() -> None:
        cursor = feed.Cursor.start(store.keys.partitions)
        while True:
            finished = done.is_set()
            page = await feed.read_page(store, "m-1", cursor, 7)
            seen.extend(i.voucher_id for i in page.items)
            cursor = page.next
            if finished and len(page.items) < 7:
                return

    read = asyncio.create_task(reader())
    await asyncio.gather(*(redeemer(i) for i in range(20)))
    done.set()
    await read
    assert len(seen) == len(set(seen)) == 400
    assert set(seen) == {v.voucher_id for v in vouchers}
